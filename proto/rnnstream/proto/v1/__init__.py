"""rnnstream.v1 native API messages and service stubs (generated)."""
