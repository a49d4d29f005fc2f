"""cxrscale launch stage. `__version__` is the toolkit's version, the one place it is set (setup.cfg reads it)."""

__version__ = "0.2.0"
