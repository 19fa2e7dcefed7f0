"""The package's version, written into stores and saved contexts."""

__version__ = "0.3.0"
