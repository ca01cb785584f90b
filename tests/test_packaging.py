"""What a non-editable install (a wheel, C{pip install .}) carries."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed() -> None:
    """pyproject.toml lists its packages by hand (twisted/plugins must stay a namespace):
    a package left out works from the source tree and editable installs, and is missing
    from a wheel, where loading its plugins fails."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "haraka_tw").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set()
