"""queue/lmtp over real loopback sockets: smtplib -> haraka_tw -> a scripted LMTP peer."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import PluginLoadError, load_plugins
from haraka_tw.paths import default_config_dir
from haraka_tw.plugins.queue.forwarding import mx_from_url
from haraka_tw.plugins.queue.smtp_forward import read_routes
from haraka_tw.smtp.state import Notes
from tests.plugins.queue.test_smtp_forward import ForwardCase, check_arrived
from tests.smtp_peers import Peer, PeerScript
from tests.support import ListLog, temp_dir, write_config

PLUGINS = "rcpt_to.in_host_list\nqueue/lmtp\n"


class LMTPTests(ForwardCase):
    def lmtp_server(self, ini: str) -> Any:
        return self.server("", plugins=PLUGINS, **{"lmtp.ini": ini})

    async def check_delivered(self, peer: Peer) -> None:
        """Two recipients sent through the server: the client's 250, and at C{peer} one
        LMTP transaction (LHLO) with both and the message byte-exact."""
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        [message] = peer.messages
        self.assertEqual(message.rcpt_to, ["bob@example.com", "carol@example.com"])
        check_arrived(self, message.data)
        self.assertIn("C: LHLO mx.test", peer.transcript)

    async def test_delivers_byte_exact_over_lmtp(self) -> None:
        """LHLO, the envelope, the message byte-exact; a 250 per recipient, then ours."""
        peer, port = self.peer(lmtp=True)
        self.lmtp_server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        await self.check_delivered(peer)

    async def test_per_recipient_replies(self) -> None:
        """One recipient refused after the message: 250 for the message, a DSN for it."""
        _, port = self.peer(lmtp=True, lmtp_replies={"carol@example.com": "552 5.2.2 Over quota"})
        server = self.lmtp_server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        [dsn] = await self.queued(server)
        self.assertEqual(
            (dsn.todo.mail_from, dsn.todo.rcpt_to[0].address), ("", "alice@client.test")
        )
        self.assertIn(b"552 5.2.2 Over quota", b"".join(server.outbound.queue.load_message(dsn)))

    async def test_deferred_recipient_requeued_for_lmtp(self) -> None:
        """One recipient deferred after the message: it is queued, routed back to LMTP."""
        _, port = self.peer(lmtp=True, lmtp_replies={"carol@example.com": "452 4.2.2 Full"})
        server = self.lmtp_server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        [entry] = await self.queued(server)
        self.assertEqual(entry.todo.notes["queue"]["wants"], "lmtp")
        self.assertEqual([r.address for r in entry.todo.rcpt_to], ["carol@example.com"])

    async def test_every_recipient_deferred_is_4xx(self) -> None:
        """Every recipient deferred after the message: the client is told 4xx, with the text."""
        _, port = self.peer(lmtp=True, lmtp_replies={"bob@example.com": "451 4.3.0 Later"})
        self.lmtp_server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com"])
        self.assertEqual(data, (451, b"4.3.0 Later"))

    def unix_peer(self, **script: Any) -> tuple[Peer, str]:
        """An LMTP peer on a Unix socket in a fresh directory."""
        peer = Peer(PeerScript(lmtp=True, **script))
        path = str(temp_dir(self) / "lmtp.sock")
        peer.start_unix(path)
        self.addCleanup(peer.stop)
        return peer, path

    async def test_delivers_over_a_unix_socket(self) -> None:
        """path= (Haraka's key; Dovecot's LMTP socket) is used instead of host and port:
        the message arrives byte-exact over the socket, and the client gets its 250."""
        peer, path = self.unix_peer()
        self.lmtp_server(f"[main]\nhost=127.0.0.1\nport=1\npath={path}\n")
        await self.check_delivered(peer)

    async def test_unix_socket_missing_is_4xx_naming_it(self) -> None:
        """No server on the socket: the client is told 4xx, and the log names the path."""
        path = str(temp_dir(self) / "nobody-listens.sock")
        server = self.lmtp_server(f"[main]\npath={path}\n")
        log: list[str] = []
        server.log.hook = lambda _, record: log.append(record.message) or True
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0] // 100, 4)
        self.assertTrue(any(path in line for line in log), log)

    async def test_deferred_recipient_goes_back_to_the_unix_socket(self) -> None:
        """A recipient deferred over the socket is queued; the outbound queue delivers it
        to the same socket later (its get_mx route carries the path)."""
        peer, path = self.unix_peer(lmtp_replies={"carol@example.com": "452 4.2.2 Full"})
        server = self.server(
            "",
            plugins=PLUGINS,
            **{
                "lmtp.ini": f"[main]\npath={path}\n",
                "outbound.ini": "[main]\nqueue_dir={base}/queue\n",  # (this one delivers)
            },
        )
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        del peer.script.lmtp_replies["carol@example.com"]  # the mailbox has room again
        for _ in range(200):
            # (flushed each time: the queue's first attempt may still be under way, and
            # so be rescheduled after one flush, when the reply to it was the old 452)
            server.outbound.flush()
            if not await self.queued(server):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await self.queued(server), [])
        delivered = [m.rcpt_to for m in peer.messages]
        self.assertEqual(delivered[0], ["bob@example.com", "carol@example.com"])
        self.assertEqual(delivered[-1], ["carol@example.com"])

    async def test_domain_section_routes_elsewhere(self) -> None:
        """A [domain] section sends that domain's recipients to its own LMTP server."""
        main, main_port = self.peer(lmtp=True)
        other, other_port = self.peer(lmtp=True)
        self.lmtp_server(
            f"[main]\nhost=127.0.0.1\nport={main_port}\n[other.test]\nport={other_port}\n"
        )
        await self.send(["bob@example.com", "dan@other.test"])
        self.assertEqual([m.rcpt_to for m in main.messages], [["bob@example.com"]])
        self.assertEqual([m.rcpt_to for m in other.messages], [["dan@other.test"]])


class ConfigTests(SynchronousTestCase):
    def test_default_is_localhost_24(self) -> None:
        """Without lmtp.ini the next hop is localhost:24, spoken to in LMTP."""
        routes = read_routes({"main": {}}, default_port=24, lmtp=True)
        self.assertEqual((str(routes.main.hosts[0]), routes.main.lmtp), ("localhost:24", True))

    def test_unix_socket_path_replaces_the_host(self) -> None:
        """path= in a section makes its route a Unix socket, also as a get_mx answer and in
        Haraka's next_hop note (lmtp://host/path), which reads back to the same socket."""
        routes = read_routes(
            {"main": {"host": "10.0.0.1"}, "x.test": {"path": "/run/dovecot/lmtp"}},
            default_port=24,
            lmtp=True,
        )
        route = routes.for_domain("x.test")
        self.assertEqual(str(route.hosts[0]), "unix:/run/dovecot/lmtp")
        self.assertEqual(route.next_hop, "lmtp://localhost/run/dovecot/lmtp")
        [mx] = route.mx_hosts()
        self.assertEqual((mx.path, mx.using_lmtp), ("/run/dovecot/lmtp", True))
        back = mx_from_url(route.next_hop)
        self.assertEqual((back.path, back.using_lmtp), ("/run/dovecot/lmtp", True))
        self.assertEqual(str(routes.main.hosts[0]), "10.0.0.1:24")

    def test_a_section_with_its_own_host_does_not_take_mains_path(self) -> None:
        """[main] path= is the default socket; a section that names its host goes there
        (as in Haraka, where a domain's section stands on its own)."""
        routes = read_routes(
            {"main": {"path": "/run/dovecot/lmtp"}, "x.test": {"host": "10.0.0.2"}, "y.test": {}},
            default_port=24,
            lmtp=True,
        )
        self.assertEqual(str(routes.for_domain("x.test").hosts[0]), "10.0.0.2:24")
        self.assertEqual(str(routes.for_domain("y.test").hosts[0]), "unix:/run/dovecot/lmtp")

    def test_next_hop_round_trip_of_odd_socket_paths(self) -> None:
        """A path with URL characters survives the next_hop note; an LMTP URL to another
        host keeps its host and port (its path is not a socket)."""
        for path in ("/run/a#b?c", "/var/spool/my lmtp.sock"):
            route = read_routes({"main": {"path": path}}, default_port=24, lmtp=True).main
            self.assertEqual(mx_from_url(route.next_hop).path, path)
        remote = mx_from_url("lmtp://10.0.0.1:2400/x")
        self.assertEqual((remote.exchange, remote.port, remote.path), ("10.0.0.1", 2400, None))

    def test_relative_path_refused(self) -> None:
        """A relative socket path is refused, naming the file and section."""
        with self.assertRaisesRegex(ValueError, r"lmtp.ini \[main\] path: 'lmtp.sock'"):
            read_routes(
                {"main": {"path": "lmtp.sock"}}, default_port=24, lmtp=True, where="lmtp.ini"
            )

    def test_bare_path_key_refused(self) -> None:
        """A path line without a value is a load error naming the file and section."""
        directory = write_config(temp_dir(self) / "c", {"lmtp.ini": "[main]\npath\n"})
        config = ConfigDirectory([default_config_dir(), directory])
        with self.assertRaisesRegex(PluginLoadError, r"lmtp.ini \[main\] path"):
            load_plugins(["queue/lmtp"], config=config, log=ListLog(), server_notes={})

    def test_smtp_forward_ignores_path(self) -> None:
        """path= means nothing to smtp_forward.ini (as in Haraka): its route stays TCP."""
        routes = read_routes({"main": {"host": "10.0.0.1", "path": "/tmp/s"}})
        self.assertEqual(str(routes.main.hosts[0]), "10.0.0.1:25")

    def test_get_mx_for_using_lmtp(self) -> None:
        """get_mx answers for queued mail noted using_lmtp (Haraka's note) by domain."""
        directory = write_config(
            temp_dir(self) / "c", {"lmtp.ini": "[main]\nhost=10.0.0.1\n[x.test]\nhost=10.0.0.2\n"}
        )
        config = ConfigDirectory([default_config_dir(), directory])
        [loaded] = load_plugins(["queue/lmtp"], config=config, log=ListLog(), server_notes={})

        class HMail:
            notes = Notes(using_lmtp=True)

        _, hosts = loaded.plugin.hook_get_mx(HMail(), "x.test")  # type: ignore[attr-defined]
        self.assertEqual(
            [(h.exchange, h.port, h.using_lmtp) for h in hosts], [("10.0.0.2", 24, True)]
        )
