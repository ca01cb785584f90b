"""Shared fixtures for the config tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .layers import Layers


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    """Empty defaults and operator directories under the test's temporary directory."""
    defaults, operator = tmp_path / "defaults", tmp_path / "config"
    defaults.mkdir()
    operator.mkdir()
    return Layers(defaults, operator)
