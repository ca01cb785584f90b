"""queue/lmtp over real loopback sockets: smtplib -> haraka_tw -> a scripted LMTP peer."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import PluginLoadError, load_plugins
from haraka_tw.paths import default_config_dir
from haraka_tw.plugins.queue.smtp_forward import read_routes
from haraka_tw.smtp.state import Notes
from tests.plugins.queue.test_smtp_forward import ForwardCase, check_arrived
from tests.support import ListLog, temp_dir, write_config

PLUGINS = "rcpt_to.in_host_list\nqueue/lmtp\n"


class LMTPTests(ForwardCase):
    def lmtp_server(self, ini: str) -> Any:
        return self.server("", plugins=PLUGINS, **{"lmtp.ini": ini})

    async def test_delivers_byte_exact_over_lmtp(self) -> None:
        """LHLO, the envelope, the message byte-exact; a 250 per recipient, then ours."""
        peer, port = self.peer(lmtp=True)
        self.lmtp_server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        [message] = peer.messages
        self.assertEqual(message.rcpt_to, ["bob@example.com", "carol@example.com"])
        check_arrived(self, message.data)
        self.assertIn("C: LHLO mx.test", peer.transcript)

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

    def test_unix_socket_path_refused(self) -> None:
        """Haraka's path= (a Unix socket) is refused at load, not silently ignored."""
        directory = write_config(temp_dir(self) / "c", {"lmtp.ini": "[main]\npath=/tmp/s\n"})
        config = ConfigDirectory([default_config_dir(), directory])
        with self.assertRaises(PluginLoadError):
            load_plugins(["queue/lmtp"], config=config, log=ListLog(), server_notes={})

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
