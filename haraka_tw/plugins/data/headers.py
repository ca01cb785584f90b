"""data.headers: Haraka's older name of the C{headers} plugin (L{haraka_tw.plugins.headers})."""

from haraka_tw.plugins.headers import Plugin

__all__ = ["Plugin"]
