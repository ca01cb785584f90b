"""The tools the bench fetches for itself into bench/.tools/ (gitignored).

- Postfix's smtp-source (the load generator) and smtp-sink (the ceiling): the Debian
  ``postfix`` package is downloaded with ``apt-get download`` and unpacked with ``dpkg -x``;
  it is never installed and no daemon is started. The binaries need the package's own
  libraries, so they run with ``LD_LIBRARY_PATH`` set to its ``usr/lib/postfix``.
- aiosmtpd 1.4.6 in its own venv (``venv-aiosmtpd``), from the package registry.
- matplotlib in its own venv (``venv-plot``), so it stays out of the project's dependencies.

Each fetch happens once and under a file lock, so a smoke test and a full run started
together do not unpack over each other.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AIOSMTPD_VERSION",
    "TOOLS_DIR",
    "Postfix",
    "ToolError",
    "aiosmtpd_python",
    "plot_python",
    "postfix",
]

TOOLS_DIR = Path(__file__).resolve().parent / ".tools"
AIOSMTPD_VERSION = "1.4.6"


class ToolError(Exception):
    """A tool could not be fetched or does not run; the message says why."""


@dataclass(frozen=True)
class Postfix:
    """The unpacked smtp-source and smtp-sink, and how to run them."""

    root: Path
    version: str

    @property
    def smtp_source(self) -> Path:
        return self.root / "usr" / "sbin" / "smtp-source"

    @property
    def smtp_sink(self) -> Path:
        return self.root / "usr" / "sbin" / "smtp-sink"

    @property
    def env(self) -> dict[str, str]:
        """The environment the binaries run in: the package's own libraries first."""
        env = dict(os.environ)
        libdir = str(self.root / "usr" / "lib" / "postfix")
        env["LD_LIBRARY_PATH"] = libdir + (
            ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
        )
        return env


@contextmanager
def _locked() -> Iterator[None]:
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    with open(TOOLS_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


def _download_postfix(into: Path) -> Path:
    """``apt-get download postfix`` into C{into} (with ``apt-get update`` first if needed)."""
    into.mkdir(parents=True, exist_ok=True)
    for old in into.glob("postfix_*.deb"):
        old.unlink()
    got = _run(["apt-get", "download", "postfix"], cwd=into)
    if got.returncode != 0 and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"])
        got = _run(["apt-get", "download", "postfix"], cwd=into)
    debs = sorted(into.glob("postfix_*.deb"))
    if got.returncode != 0 or not debs:
        raise ToolError(
            "cannot download the postfix .deb (apt-get download postfix): "
            + (got.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return debs[-1]


def _check_postfix(found: Postfix) -> None:
    """smtp-source and smtp-sink start (they print their usage and exit 1 with no args)."""
    for binary in (found.smtp_source, found.smtp_sink):
        if not binary.exists():
            raise ToolError(f"{binary} is missing from the postfix package")
        ran = subprocess.run(
            [str(binary)], env=found.env, capture_output=True, text=True, check=False
        )
        if "usage" not in ran.stderr:
            raise ToolError(f"{binary.name} does not run: {ran.stderr.strip()[:300]}")


def postfix() -> Postfix:
    """smtp-source and smtp-sink, unpacked from the Debian postfix package (once)."""
    root = TOOLS_DIR / "postfix"
    with _locked():
        version_file = root / "VERSION"
        if version_file.exists():
            found = Postfix(root, version_file.read_text().strip())
            _check_postfix(found)
            return found
        deb = _download_postfix(TOOLS_DIR / "download")
        if root.exists():
            subprocess.run(["rm", "-rf", str(root)], check=True)
        unpacked = _run(["dpkg", "-x", str(deb), str(root)])
        if unpacked.returncode != 0:
            raise ToolError(f"dpkg -x {deb.name} failed: {unpacked.stderr.strip()}")
        # postfix_3.7.11-0+deb12u1_amd64.deb -> 3.7.11-0+deb12u1
        version = deb.name.split("_")[1]
        found = Postfix(root, version)
        _check_postfix(found)
        version_file.write_text(version + "\n")
        return found


def _venv(name: str, requirement: str, module: str) -> Path:
    """A venv under bench/.tools/ holding C{requirement}; its python."""
    home = TOOLS_DIR / name
    python = home / "bin" / "python"
    with _locked():
        if python.exists() and _run([str(python), "-c", f"import {module}"]).returncode == 0:
            return python
        made = _run([sys.executable, "-m", "venv", "--clear", str(home)])
        if made.returncode != 0:
            raise ToolError(f"cannot create {home}: {made.stderr.strip()}")
        # (no registry: one retry of 15 s, not pip's five; the bench goes on without it)
        pip = _run(
            [str(python), "-m", "pip", "install", "-q", "--timeout=15", "--retries=1", requirement]
        )
        if pip.returncode != 0:
            raise ToolError(f"pip install {requirement} failed: {pip.stderr.strip()[-300:]}")
        return python


def aiosmtpd_python() -> Path:
    """The python of the aiosmtpd venv."""
    return _venv("venv-aiosmtpd", f"aiosmtpd=={AIOSMTPD_VERSION}", "aiosmtpd")


def plot_python() -> Path:
    """The python of the matplotlib venv."""
    return _venv("venv-plot", "matplotlib", "matplotlib")
