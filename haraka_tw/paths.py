"""Where the shipped default configuration lives."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_config_dir"]


def default_config_dir() -> Path:
    """The shipped etc/ directory: inside the installed package, or beside it in a checkout."""
    packaged = Path(__file__).resolve().parent / "_etc"
    if (packaged / "smtp.ini").is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "etc"
    if (checkout / "smtp.ini").is_file():
        return checkout
    raise FileNotFoundError(
        f"the default config directory is missing (looked in {packaged} and {checkout})"
    )
