"""haraka_tw: a Haraka-style mail transfer agent framework on Twisted."""

__version__ = "0.1.0"
__all__ = ["__version__"]
