"""C{haraka-tw queue}: look at the outbound queue and act on it.

- C{list [--json]}: one line per queued message: id, age, sender, recipients, failed
  attempts, next attempt, last error.
- C{stat [--json]}: counts per destination domain: due, deferred, error.
- C{show ID}: the envelope, the history and the message's headers.
- C{flush [DOMAIN]}: retry now (every deferred message, or a domain's).
- C{delete ID...}: remove messages without a report to the sender.
- C{bounce ID...}: give up on messages: a failure report (DSN) to each sender, then remove.

The queue directory is the server's (L{queue_dir_of}, from C{-c CONFIG_DIR}) unless
C{--queue-dir} names one. When no server holds the queue's lock the tool acts directly
(holding the lock meanwhile); when one does, it leaves a control file the server carries
out, and says so. An ID is the stable id L{list} prints, or a full file name.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from haraka_tw.config import ConfigDirectory
from haraka_tw.config.errors import ConfigError
from haraka_tw.outbound.bounce import RecipientFailure, bounce_todo, build_dsn, dsn_template
from haraka_tw.outbound.qfile import QueueFileError
from haraka_tw.outbound.queue import QueueEntry, QueueStore, queue_dir_of
from haraka_tw.paths import default_config_dir

__all__ = ["add_queue_parser", "bounce_entry", "main"]


class _Fail(Exception):
    """A message for stderr and exit status 1."""


def _span(seconds: float) -> str:
    """A duration, short: 45s, 12m, 3h05m, 2d04h."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _config(args: argparse.Namespace) -> ConfigDirectory:
    dirs: list[Path] = [default_config_dir()]
    if args.config is not None:
        path = Path(args.config)
        if not path.is_dir():
            raise _Fail(f"config directory {path} does not exist")
        dirs.append(path)
    return ConfigDirectory(dirs)


def _store(args: argparse.Namespace) -> QueueStore:
    queue_dir = Path(args.queue_dir) if args.queue_dir else queue_dir_of(_config(args))
    if not queue_dir.is_dir():
        raise _Fail(f"no queue directory at {queue_dir}")
    return QueueStore(queue_dir, log=lambda line: print(line, file=sys.stderr))


def _resolve(store: QueueStore, idents: list[str]) -> list[QueueEntry]:
    """The entries named, in order; unknown or unreadable ones are reported on stderr."""
    found: list[QueueEntry] = []
    for ident in idents:
        try:
            entry = store.find(ident)
        except QueueFileError as e:
            print(f"haraka-tw: {ident}: unreadable: {e.reason}", file=sys.stderr)
            continue
        if entry is None:
            print(f"haraka-tw: {ident}: no such message in {store.dir}", file=sys.stderr)
        else:
            found.append(entry)
    return found


def _held(store: QueueStore) -> str:
    pid = store.lock_holder()
    return f"a running server (pid {pid})" if pid else "a running server"


# -- reading ---------------------------------------------------------------------------


def _entry_json(entry: QueueEntry, now: float) -> dict[str, Any]:
    return {
        "id": entry.id,
        "file": entry.filename,
        "domain": entry.todo.domain,
        "mail_from": entry.todo.mail_from,
        "rcpt_to": [r.address for r in entry.todo.rcpt_to],
        "arrival": entry.name.arrival,
        "age": round(now - entry.name.arrival, 3),
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_error": entry.last_error,
        "size": entry.message_size,
        "uuid": entry.todo.uuid,
    }


def _list(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    now = time.time()
    listing = store.listing()
    if args.json:
        json.dump(
            {
                "entries": [_entry_json(e, now) for e in listing.entries],
                "unreadable": [{"file": p.name, "error": why} for p, why in listing.bad],
                "set_aside": [p.name for p in listing.set_aside],
            },
            out,
            indent=2,
            ensure_ascii=False,
        )
        out.write("\n")
        return 0
    rows = [("ID", "AGE", "FROM", "TO", "TRIES", "NEXT", "LAST ERROR")]
    for e in listing.entries:
        rcpts = e.todo.rcpt_to
        to = rcpts[0].address + (f" +{len(rcpts) - 1}" if len(rcpts) > 1 else "")
        wait = e.next_attempt - now
        rows.append(
            (
                e.id,
                _span(now - e.name.arrival),
                e.todo.mail_from or "<>",
                to,
                str(e.attempts),
                "due" if wait <= 0 else f"in {_span(wait)}",
                (e.last_error or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
    for path, why in listing.bad:
        out.write(f"unreadable: {path.name}: {why}\n")
    total = len(listing.entries)
    out.write(f"{total} message{'s' if total != 1 else ''} queued")
    out.write(f", {len(listing.set_aside)} set aside as error.*\n" if listing.set_aside else "\n")
    return 0


def _stat(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    now = time.time()
    listing = store.listing()
    counts: dict[str, dict[str, int]] = {}

    def bump(domain: str, state: str) -> None:
        counts.setdefault(domain, {"due": 0, "deferred": 0, "error": 0})[state] += 1

    for e in listing.entries:
        bump(e.todo.domain.lower(), "due" if e.next_attempt <= now else "deferred")
    for _ in [*listing.bad, *listing.set_aside]:
        bump("(unreadable)", "error")
    total = {s: sum(c[s] for c in counts.values()) for s in ("due", "deferred", "error")}
    if args.json:
        json.dump({"domains": counts, "total": total}, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    width = max([len("DOMAIN"), len("total"), *(len(d) for d in counts)])
    out.write(f"{'DOMAIN'.ljust(width)}  {'DUE':>6}  {'DEFERRED':>8}  {'ERROR':>6}\n")
    for domain, c in [*sorted(counts.items()), ("total", total)]:
        line = f"{domain.ljust(width)}  {c['due']:>6}  {c['deferred']:>8}  {c['error']:>6}"
        out.write(line + "\n")
    return 0


def _show(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    entries = _resolve(store, [args.id])
    if not entries:
        return 1
    (e,) = entries
    todo = e.todo
    now = time.time()
    out.write(f"id:           {e.id}\nfile:         {e.path}\n")
    out.write(f"domain:       {todo.domain}\nuuid:         {todo.uuid}\n")
    out.write(f"from:         <{todo.mail_from}>\n")
    for r in todo.rcpt_to:
        params = " ".join(f"{k}={v}" for k, v in r.params.items())
        out.write(f"to:           <{r.address}>{' ' + params if params else ''}\n")
    out.write(f"arrived:      {time.ctime(e.name.arrival)} ({_span(now - e.name.arrival)} ago)\n")
    out.write(f"attempts:     {e.attempts}\nnext attempt: {time.ctime(e.next_attempt)}\n")
    extras = {"ret": todo.ret, "envid": todo.envid, "force_tls": todo.force_tls or None}
    for key, value in extras.items():
        if value is not None:
            out.write(f"{key + ':':<14}{value}\n")
    out.write(f"size:         {e.message_size} bytes\n")
    if todo.notes:
        notes = json.dumps(todo.notes, ensure_ascii=False, default=str)
        out.write(f"notes:        {notes}\n")
    for attempt in e.history:
        out.write(f"failed:       {time.ctime(attempt.time)} #{attempt.attempt}: {attempt.error}\n")
    out.write("\n")
    head = bytearray()
    for chunk in store.load_message(e):
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            del head[end + 2 :]
            break
    out.write(head.decode("utf-8", "replace").replace("\r\n", "\n"))
    return 0


# -- acting ----------------------------------------------------------------------------


def bounce_entry(
    store: QueueStore, entry: QueueEntry, config: ConfigDirectory, now: float
) -> QueueEntry | None:
    """Give up on C{entry}: queue a failure report to its sender (unless none is due) and
    remove it. Returns the report's entry, or None when no report was sent."""
    failures = [
        RecipientFailure(recipient=r, status="5.0.0", reason="bounced by the queue administrator")
        for r in entry.todo.rcpt_to
    ]
    report = None
    envelope = bounce_todo(entry.todo, now)
    if envelope is not None:
        me = str(config.get_value("me", None) or socket.getfqdn() or "localhost")
        dsn = build_dsn(
            entry.todo,
            failures,
            action="failed",
            reporting_mta=me,
            message_chunks=store.load_message(entry),
            now=now,
            template=dsn_template(config, "failed"),
            arrival=entry.todo.queue_time or entry.name.arrival,
        )
        if dsn is not None:
            report = store.add(envelope, [dsn])
    store.remove(entry)
    return report


def _act(
    args: argparse.Namespace,
    out: TextIO,
    control: tuple[str, dict[str, Any]],
    direct: Callable[[QueueStore], int],
) -> int:
    store = _store(args)
    if store.lock():
        try:
            return direct(store)
        finally:
            store.unlock()
    action, control_args = control
    path = store.post_control(action, control_args)
    out.write(
        f"{_held(store)} holds {store.dir}; asked it to {action} "
        f"(control file {path.name}); it acts on its next queue check\n"
    )
    return 0


def _flush(args: argparse.Namespace, out: TextIO) -> int:
    domain = args.domain.lower() if args.domain else None

    def direct(store: QueueStore) -> int:
        now = time.time()
        count = 0
        for e in store.listing().entries:
            if (domain is None or e.todo.domain.lower() == domain) and e.next_attempt > now:
                store.reschedule(e, now, e.attempts, None)
                count += 1
        out.write(f"flushed {count} message{'s' if count != 1 else ''}: due now\n")
        return 0

    return _act(args, out, ("flush", {"domain": domain}), direct)


def _by_ids(args: argparse.Namespace, out: TextIO, action: str) -> int:
    store = _store(args)
    entries = _resolve(store, args.ids)
    failed = len(entries) != len(args.ids)
    if not entries:
        return 1

    def direct(store: QueueStore) -> int:
        config = _config(args) if action == "bounce" else None
        for e in entries:
            if config is None:
                store.remove(e)
                out.write(f"deleted {e.id}\n")
                continue
            report = bounce_entry(store, e, config, time.time())
            note = f"report queued as {report.id}" if report else "no report due"
            out.write(f"bounced {e.id} ({note})\n")
        return 1 if failed else 0

    status = _act(args, out, (action, {"ids": [e.id for e in entries]}), direct)
    return 1 if failed else status


def _delete(args: argparse.Namespace, out: TextIO) -> int:
    return _by_ids(args, out, "delete")


def _bounce(args: argparse.Namespace, out: TextIO) -> int:
    return _by_ids(args, out, "bounce")


# -- the command line ------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.queue_func(args, sys.stdout))
    except _Fail as e:
        print(f"haraka-tw: {e}", file=sys.stderr)
        return 1
    except (ConfigError, OSError) as e:
        print(f"haraka-tw: {e}", file=sys.stderr)
        return 1


def add_queue_parser(sub: Any) -> None:
    """Add C{queue} and its subcommands to the C{haraka-tw} subparsers C{sub}."""
    queue = sub.add_parser("queue", help="list, inspect, flush, delete or bounce queued mail")
    queue.set_defaults(func=_run)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None, help="the server's config directory")
    common.add_argument("--queue-dir", default=None, help="the queue directory itself")
    commands = queue.add_subparsers(dest="queue_command", required=True)

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = commands.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(queue_func=func)
        return p

    command("list", _list, "one line per queued message").add_argument(
        "--json", action="store_true"
    )
    command("stat", _stat, "counts per domain: due, deferred, error").add_argument(
        "--json", action="store_true"
    )
    command("show", _show, "a message's envelope, history and headers").add_argument("id")
    command("flush", _flush, "retry deferred messages now").add_argument("domain", nargs="?")
    command("delete", _delete, "remove messages, no report").add_argument("ids", nargs="+")
    command("bounce", _bounce, "remove messages with a report").add_argument("ids", nargs="+")


def main(argv: list[str] | None = None) -> int:
    """C{haraka-tw queue ...} on its own (argv without the leading C{queue})."""
    parser = argparse.ArgumentParser(prog="haraka-tw")
    add_queue_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["queue", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
