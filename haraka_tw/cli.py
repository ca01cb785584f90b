"""The haraka-tw command: operator tools that are not the server itself.

- C{haraka-tw init DIR}: create an operator's config directory from the shipped defaults
  (Haraka's C{haraka -i}).
- C{haraka-tw plugins [-c DIR]}: list the plugins the config loads and the hooks each answers.
- C{haraka-tw hooks}: print the hook firing order.
- C{haraka-tw queue list|stat|show|flush|delete|bounce}: the outbound queue
  (L{haraka_tw.outbound.tools}).
- C{haraka-tw dkim-keygen DOMAIN [-c DIR]}: a DKIM signing key for the C{dkim} plugin,
  and the DNS record to publish (Haraka's dkim_key_gen.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from haraka_tw.interfaces import HOOKS
from haraka_tw.outbound.tools import add_queue_parser
from haraka_tw.paths import default_config_dir

__all__ = ["main"]


def _init(args: argparse.Namespace) -> int:
    target = Path(args.directory)
    try:
        if target.exists() and not target.is_dir():
            print(f"haraka-tw: {target} is not a directory", file=sys.stderr)
            return 1
        if target.exists() and any(target.iterdir()) and not args.force:
            print(
                f"haraka-tw: {target} exists and is not empty (use --force to add missing files)",
                file=sys.stderr,
            )
            return 1
        copied = _copy_defaults(target)
    except OSError as e:
        where = e.filename or target
        print(f"haraka-tw: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"created {target} with {copied} config files; run: twistd -n haraka --config {target}")
    return 0


def _copy_defaults(target: Path) -> int:
    """Copy the shipped config files missing from C{target}; how many were copied."""
    source = default_config_dir()
    copied = 0
    for path in sorted(source.rglob("*")):
        if path.is_dir() or path.name.startswith((".", "__")) or path.suffix == ".py":
            continue
        dest = target / path.relative_to(source)
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        copied += 1
    return copied


def _plugins(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from haraka_tw.server import HarakaServer, StartupError

    try:
        server = HarakaServer.from_directory(args.config, reactor)
    except StartupError as e:
        print(f"haraka-tw: {e}", file=sys.stderr)
        return 1
    for loaded in server.runner.plugins:
        print(f"{loaded.name}: {', '.join(loaded.hooks())}")
    for skipped in server.skipped_plugins:  # (smtp.ini ignore_bad_plugins)
        print(f"{skipped.name}: NOT LOADED: {skipped.reason} ({skipped.where.rstrip(': ')})")
    return 0


def _hooks(args: argparse.Namespace) -> int:
    for name, iface in HOOKS.items():
        print(f"{name:22} {iface.__name__}")
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    from haraka_tw.plugins.dkim import write_key

    config = Path(args.config) if args.config else Path.cwd()
    try:
        folder, _ = write_key(
            config, args.domain, args.selector, bits=args.bits, ed25519=args.ed25519
        )
    except (ValueError, FileExistsError) as e:
        print(f"haraka-tw: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"haraka-tw: {e.filename or config}: {e.strerror or e}", file=sys.stderr)
        return 1
    print((folder / "dns").read_text(), end="")
    print(f"\nthe key is in {folder}; set [sign] enabled=true in dkim.ini to sign with it")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="haraka-tw", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create a config directory from the shipped defaults")
    p.add_argument("directory")
    p.add_argument(
        "--force", action="store_true", help="add missing files to an existing directory"
    )
    p.set_defaults(func=_init)
    p = sub.add_parser(
        "plugins",
        help="list the plugins a config loads and their hooks",
        description="Load the config's plugins as the server would (their register() runs)"
        " and list each with the hooks it answers.",
    )
    p.add_argument(
        "-c", "--config", default=None, help="the config directory (default: the shipped one)"
    )
    p.set_defaults(func=_plugins)
    p = sub.add_parser("hooks", help="print the hooks in firing order")
    p.set_defaults(func=_hooks)
    p = sub.add_parser(
        "dkim-keygen",
        help="make a DKIM signing key and the DNS record to publish",
        description="Write DIR/dkim/DOMAIN/private (mode 0600), public, selector and dns (the"
        " TXT record to publish), for the dkim plugin. An existing key is never replaced.",
    )
    p.add_argument("domain")
    p.add_argument(
        "-c", "--config", default=None, help="the config directory (default: the current one)"
    )
    p.add_argument("-s", "--selector", default=None, help="default: the month, e.g. nov2026")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--ed25519", action="store_true", help="an Ed25519 key (RFC 8463)")
    p.set_defaults(func=_dkim_keygen)
    add_queue_parser(sub)
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # (a queue file's notes may hold any bytes)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # (here, not at exit: a closed pipe is then one we can catch)
        return status
    except BrokenPipeError:  # (| head: the reader has what it wanted)
        # Python's own flush at exit would fail again: point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
