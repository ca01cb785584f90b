"""Shared fixtures: a two-layer config stack in real temporary directories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from haraka_tw.config import ConfigDirectory


@dataclass
class Layers:
    """A defaults directory under an operator directory, and the log lines seen."""

    defaults: Path
    operator: Path
    logged: list[str] = field(default_factory=list)

    def write(self, layer: Path, name: str, text: str | bytes) -> Path:
        path = layer / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def config(self) -> ConfigDirectory:
        return ConfigDirectory([self.defaults, self.operator], log=self.logged.append)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    defaults, operator = tmp_path / "defaults", tmp_path / "config"
    defaults.mkdir()
    operator.mkdir()
    return Layers(defaults, operator)
