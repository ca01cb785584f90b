"""dkim_verify: Haraka's older name of the C{dkim} plugin (L{haraka_tw.plugins.dkim}),
which reads dkim.ini as Haraka's C{dkim} does."""

from haraka_tw.plugins.dkim import Plugin

__all__ = ["Plugin"]
