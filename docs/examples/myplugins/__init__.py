"""Plugins written in docs/tutorial.md."""
