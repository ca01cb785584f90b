"""Tests for haraka_tw.config.watch and ConfigDirectory.start_watching, on task.Clock."""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.task import Clock

from haraka_tw.config.watch import ConfigWatcher

from .layers import Layers


class Probe:
    """Reports whatever change the test sets, and counts reloads."""

    def __init__(self) -> None:
        self.change: Hashable | None = None
        self.reloads = 0

    def __call__(self) -> Hashable | None:
        return self.change

    def reload(self) -> None:
        self.reloads += 1
        self.change = None


def watcher(clock: Clock, probe: Probe, logged: list[str]) -> ConfigWatcher:
    return ConfigWatcher(clock, 1.0, probe, probe.reload, logged.append)


def test_no_change_no_reload() -> None:
    """Ticks that see no change never reload."""
    clock, probe = Clock(), Probe()
    watch = watcher(clock, probe, [])
    watch.start()
    clock.pump([1.0] * 5)
    assert probe.reloads == 0
    watch.stop()


def test_settled_change_reloads_once() -> None:
    """A change seen the same on two ticks running reloads once."""
    clock, probe = Clock(), Probe()
    watch = watcher(clock, probe, [])
    watch.start()
    probe.change = "a"
    clock.advance(1.0)
    assert probe.reloads == 0
    clock.advance(1.0)
    assert probe.reloads == 1
    clock.pump([1.0] * 3)
    assert probe.reloads == 1
    watch.stop()


def test_change_still_moving_waits() -> None:
    """While the change keeps changing between ticks, reload waits for it to settle."""
    clock, probe = Clock(), Probe()
    watch = watcher(clock, probe, [])
    watch.start()
    for state in ("a", "b", "c"):
        probe.change = state
        clock.advance(1.0)
    assert probe.reloads == 0
    clock.advance(1.0)
    assert probe.reloads == 1
    watch.stop()


def test_stop_stops_polling() -> None:
    """After stop() no more ticks run and nothing is scheduled."""
    clock, probe = Clock(), Probe()
    watch = watcher(clock, probe, [])
    watch.start()
    assert watch.running
    watch.stop()
    watch.stop()
    assert not watch.running
    assert clock.getDelayedCalls() == []


def test_probe_error_logged_and_polling_continues() -> None:
    """An exception in a tick is logged and the next tick still runs."""
    clock, logged = Clock(), list[str]()

    def broken() -> Hashable | None:
        raise OSError("disk gone")

    watch = ConfigWatcher(clock, 1.0, broken, lambda: None, logged.append)
    watch.start()
    clock.pump([1.0, 1.0])
    assert len(logged) == 2 and "disk gone" in logged[0]
    assert watch.running
    watch.stop()


def test_start_watching_picks_up_edit(layers: Layers) -> None:
    """start_watching on a task.Clock reloads an edit and runs the on_change callbacks."""
    path = layers.write(layers.operator, "plugins", "a\n")
    config = layers.config()
    seen: list[list[str]] = []
    config.get_list("plugins")
    config.on_change("plugins", lambda: seen.append(config.get_list("plugins")))
    clock = Clock()
    config.start_watching(clock, interval=1.0)
    clock.advance(1.0)
    path.write_text("a\nb\n")
    clock.advance(1.0)
    assert seen == []
    clock.advance(1.0)
    assert seen == [["a", "b"]]
    clock.pump([1.0] * 3)
    assert len(seen) == 1
    config.stop_watching()


def test_start_watching_sees_new_and_deleted_files(layers: Layers) -> None:
    """The watcher notices a file appearing and then being deleted."""
    config = layers.config()
    changes: list[object] = []
    assert config.get_value("me", "default") == "default"
    config.on_change("me", lambda: changes.append(config.get_value("me", "default")))
    clock = Clock()
    config.start_watching(clock)
    path = layers.write(layers.operator, "me", "mx.example.com\n")
    clock.pump([1.0, 1.0])
    path.unlink()
    clock.pump([1.0, 1.0])
    assert changes == ["mx.example.com", "default"]
    config.stop_watching()


def test_watching_logs_reload_errors(layers: Layers) -> None:
    """A bad edit seen by the watcher is logged once and the old value kept."""
    path = layers.write(layers.operator, "x.json", '{"a": 1}')
    config = layers.config()
    config.get_json("x.json")
    clock = Clock()
    config.start_watching(clock)
    path.write_text('{"a": 2,\n')
    clock.pump([1.0] * 5)
    assert config.get_json("x.json") == {"a": 1}
    assert len(layers.logged) == 1 and layers.logged[0].startswith(f"{path}:2: ")
    config.stop_watching()


def test_start_watching_twice_keeps_one_loop(layers: Layers) -> None:
    """Starting again replaces the running watcher; stop_watching ends it."""
    config = layers.config()
    clock = Clock()
    config.start_watching(clock)
    config.start_watching(clock, interval=2.0)
    assert len(clock.getDelayedCalls()) == 1
    config.stop_watching()
    config.stop_watching()
    assert clock.getDelayedCalls() == []
