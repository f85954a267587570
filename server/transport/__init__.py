"""Transports over the core engine."""
