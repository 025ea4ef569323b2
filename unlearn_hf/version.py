"""The library version (a leaf module: persistence and the CLI read it without importing the package)."""

__version__ = "0.1.0"
