"""The package version (a leaf: backends record it in what they build)."""
__version__ = "0.1.0"
