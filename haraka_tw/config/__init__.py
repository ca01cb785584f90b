"""Haraka-style config files, read through overlaid directories and reloaded on change.

``ConfigDirectory([defaults_dir, operator_dir])`` reads an operator's Haraka ``config/``
directory with the same meaning Haraka gives it: ``value``, ``list``, ``data``, ``ini``
(Haraka's dialect, with declared booleans), ``json``, ``yaml`` and ``binary`` files, and
the single-file ``smtp.json`` / ``smtp.yaml``.

Modules: :mod:`.formats` (flat, JSON and YAML parsers), :mod:`.ini` (the INI dialect and
boolean declarations), :mod:`.bundle` (``smtp.json``), :mod:`.overlay` (one name through
the directory stack), :mod:`.snapshot` (change detection), :mod:`.watch` (polling) and
:mod:`.directory` (the public reader).
"""

from haraka_tw.config.directory import ConfigDirectory
from haraka_tw.config.errors import ConfigError

__all__ = ["ConfigDirectory", "ConfigError"]
