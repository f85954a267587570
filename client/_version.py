"""The rnnstream release: one place, read by the package, the build and both commands."""

__version__ = "0.2.0"
