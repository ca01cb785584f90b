"""A two-layer config stack in real temporary directories, for the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from haraka_tw.config import ConfigDirectory


@dataclass
class Layers:
    """A defaults directory under an operator directory, and the log lines seen."""

    defaults: Path
    operator: Path
    logged: list[str] = field(default_factory=list)

    def write(self, layer: Path, name: str, text: str | bytes) -> Path:
        """Write ``name`` (subdirectories made as needed) in ``layer``; return its path."""
        path = layer / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def config(self) -> ConfigDirectory:
        """A ConfigDirectory over both layers that logs into :attr:`logged`."""
        return ConfigDirectory([self.defaults, self.operator], log=self.logged.append)
