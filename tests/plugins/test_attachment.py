"""attachment over sockets: messages sent with smtplib to a real server, their archives
looked into by the real bsdtar (made here: tests/archives.py)."""

from __future__ import annotations

import base64
import gc
import gzip
import hashlib
import io
import tempfile
import warnings
import zipfile
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw import archive
from haraka_tw.codes import CONT, DENY, OK
from haraka_tw.interfaces import IConnectHook, IDataPostHook, IQueueHook, IQueueOutboundHook
from haraka_tw.plugins import attachment
from tests.archives import encrypted_zip, nested_zip, tgz_of, zip_of
from tests.support import data_reply, start_server, temp_dir

KEPT: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
EXE = b"MZ\x90\x00 not really a program"


@implementer(IQueueHook, IQueueOutboundHook)
class Keep:
    """Test plugin: keeps the notes and the attachment results of each message queued."""

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        KEPT.append((dict(txn.notes), txn.results.get("attachment")))
        return OK

    hook_queue_outbound = hook_queue  # (a relaying client's mail)


@implementer(IDataPostHook)
class RefuseAll:
    """Test plugin: refuses every message at data_post, before attachment's turn."""

    def hook_data_post(self, connection: Any) -> Any:
        return DENY


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _zip_with_twins(name: str, first: bytes, second: bytes) -> bytes:
    """A zip with two members called C{name}."""
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as archive:
        warnings.simplefilter("ignore")  # (zipfile warns of the duplicate)
        archive.writestr(name, first)
        archive.writestr(name, second)
    return out.getvalue()


@implementer(IConnectHook)
class Relaying:
    """Test plugin: every client may relay."""

    def hook_connect(self, connection: Any) -> Any:
        connection.relaying = True
        return CONT


def part(filename: str | None, ctype: str, data: bytes) -> str:
    named = f'; filename="{filename}"' if filename is not None else ""
    body = base64.encodebytes(data).decode().replace("\n", "\r\n")
    return (
        f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment{named}\r\n\r\n{body}"
    )


def message(*parts: str) -> bytes:
    """A multipart/mixed message: some text, then C{parts}."""
    head = (
        "From: ann@sender.example\r\nTo: bob@example.com\r\nSubject: files\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThe files.\r\n"
    )
    return (head + "".join(f"--B\r\n{p}\r\n" for p in parts) + "--B--\r\n").encode()


def send(port: int, data: bytes) -> Deferred[tuple[int, bytes]]:
    """Send C{data} to bob@example.com; the reply to the end of DATA. KEPT then holds
    what was queued of this message alone."""
    KEPT.clear()
    return data_reply(port, "ann@sender.example", ["bob@example.com"], data)


class AttachmentTests(TestCase):
    def setUp(self) -> None:
        if attachment.find_bsdtar() is None:
            raise SkipTest("bsdtar is not installed (libarchive-tools)")
        KEPT.clear()
        # each message's work directory goes here, to be seen removed
        self.tmp = temp_dir(self) / "tmp"
        self.tmp.mkdir()
        self.patch(tempfile, "tempdir", str(self.tmp))

    def server(self, ini: str = "", plugins: str = "", **files: str) -> int:
        _, port = start_server(
            self,
            {
                "plugins": f"{plugins}attachment\nrcpt_to.in_host_list\n{__name__}:Keep\n",
                "attachment.ini": ini,
                "host_list": "example.com\n",
                **files,
            },
        )
        return port

    def left_behind(self) -> list[Any]:
        return list(self.tmp.glob("haraka-attachment-*"))

    def assertRefused(self, got: tuple[int, bytes], text: str) -> None:
        self.assertEqual(got, (550, f"5.7.1 {text}".encode()))
        self.assertEqual(KEPT, [])
        self.assertEqual(self.left_behind(), [])  # nothing left behind

    @inlineCallbacks
    def test_a_clean_message_is_recorded_as_haraka_records_it(self) -> Any:
        """Each attachment's name, type, size and MD5 in the results and the notes; the
        archive's names in attachment_archive_files; the message goes on."""
        port = self.server()
        pdf, bundle = b"%PDF-1.4 a report", zip_of({"notes.txt": b"hi", "img/a.png": b"png"})
        got = yield send(
            port,
            message(
                part("report.pdf", "application/pdf", pdf),
                part("bundle.zip", "application/zip", bundle),
            ),
        )
        self.assertEqual(got, (250, b""))
        ((notes, results),) = KEPT
        self.assertEqual(notes["attachment_count"], 2)
        self.assertEqual(notes["attachment_files"], ["report.pdf", "bundle.zip"])
        self.assertEqual(
            notes["attachment_archive_files"], ["bundle.zip/notes.txt", "bundle.zip/img/a.png"]
        )
        self.assertIn("application/pdf", notes["attachment_ctypes"])
        self.assertIn("multipart/mixed", notes["attachment_ctypes"])
        self.assertEqual(
            results["attach"],
            [
                {
                    "file": "report.pdf",
                    "ctype": "application/pdf",
                    "md5": hashlib.md5(pdf).hexdigest(),
                    "bytes": len(pdf),
                },
                {
                    "file": "bundle.zip",
                    "ctype": "application/zip",
                    "md5": hashlib.md5(bundle).hexdigest(),
                    "bytes": len(bundle),
                },
            ],
        )
        self.assertEqual(results["pass"], ["archives"])
        self.assertEqual(self.left_behind(), [])

    @inlineCallbacks
    def test_a_disallowed_extension_is_refused(self) -> Any:
        """By the shipped list, in any case, whatever trailing dots or spaces follow it
        (Windows drops them)."""
        port = self.server()
        for name in ("setup.exe", "INVOICE.PDF.SCR", "run.bat. . "):
            got = yield send(port, message(part(name, "application/octet-stream", EXE)))
            ext = name.rstrip(". ").rsplit(".", 1)[1].lower()
            self.assertRefused(got, f"Message contains disallowed file extension ({ext})")
        got = yield send(port, message(part("photo.jpeg", "image/jpeg", b"\xff\xd8")))
        self.assertEqual(got, (250, b""))

    @inlineCallbacks
    def test_disallowed_extensions_from_the_ini(self) -> Any:
        """An operator's list replaces the shipped one; empty items are left out (Haraka's
        made an empty alternative that matched any name ending in a dot)."""
        port = self.server("disallowed_extensions=docm, ,js;\n")
        got = yield send(port, message(part("x.JS", "text/javascript", b"alert(1)")))
        self.assertRefused(got, "Message contains disallowed file extension (js)")
        got = yield send(port, message(part("x.", "application/octet-stream", b"x")))
        self.assertEqual(got[0], 250)
        got = yield send(port, message(part("setup.exe", "application/octet-stream", b"x")))
        self.assertEqual(got[0], 550)  # still refused: by attachment.filename.regex
        self.assertIn(b"unacceptable attachment (setup.exe)", got[1])

    @inlineCallbacks
    def test_a_content_type_of_any_part_is_refused(self) -> Any:
        """attachment.ctype.regex is searched (not anchored) in every part's type, one
        deep inside a forwarded message too."""
        port = self.server()
        got = yield send(port, message(part("a", "application/x-executable", b"\x7fELF")))
        self.assertRefused(
            got, "Message contains unacceptable content type (application/x-executable)"
        )
        inner = (
            "Content-Type: message/rfc822\r\n\r\n"
            'Content-Type: multipart/mixed; boundary="I"\r\n\r\n'
            "--I\r\nContent-Type: message/partial; id=1; number=1\r\n\r\nx\r\n--I--"
        )
        got = yield send(port, message(inner))
        self.assertRefused(got, "Message contains unacceptable content type (message/partial)")

    @inlineCallbacks
    def test_a_name_matching_attachment_filename_regex_is_refused(self) -> Any:
        port = self.server(**{"attachment.filename.regex": "^payroll.*\\.xlsm$\n"})
        got = yield send(port, message(part("Payroll-2026.XLSM", "application/zip", b"x")))
        self.assertRefused(got, "Message contains unacceptable attachment (Payroll-2026.XLSM)")

    @inlineCallbacks
    def test_a_program_inside_an_archive_is_refused(self) -> Any:
        """A zip, a tar.gz, and a zip in a zip: the path of archives is named."""
        port = self.server()
        got = yield send(port, message(part("a.zip", "application/zip", zip_of({"x.exe": EXE}))))
        self.assertRefused(got, "Message contains disallowed file extension (exe)")
        got = yield send(port, message(part("b.tgz", "application/gzip", tgz_of({"r.vbs": b""}))))
        self.assertRefused(got, "Message contains disallowed file extension (vbs)")
        nested = zip_of({"docs/inner.zip": zip_of({"readme.txt": b"", "go.scr": EXE})})
        got = yield send(port, message(part("c.zip", "application/zip", nested)))
        self.assertRefused(got, "Message contains disallowed file extension (scr)")

    @inlineCallbacks
    def test_attachment_archive_filename_regex(self) -> Any:
        port = self.server(**{"attachment.archive.filename.regex": "/passwords\\.txt$\n"})
        data = zip_of({"a/passwords.txt": b"hunter2"})
        got = yield send(port, message(part("backup.zip", "application/zip", data)))
        self.assertRefused(
            got, "Message contains unacceptable attachment (backup.zip/a/passwords.txt)"
        )

    @inlineCallbacks
    def test_a_name_that_is_a_pattern_is_looked_into_as_itself(self) -> Any:
        """An inner archive named with bsdtar's wildcards is extracted by its exact name
        (Haraka's was read as a pattern, and matched nothing, or another member)."""
        port = self.server()
        inner = zip_of({"evil.pif": EXE})
        data = zip_of({"[1]*.zip": inner, "11.zip": zip_of({"fine.txt": b""})})
        got = yield send(port, message(part("o.zip", "application/zip", data)))
        self.assertRefused(got, "Message contains disallowed file extension (pif)")

    @inlineCallbacks
    def test_an_archive_is_known_by_its_first_bytes(self) -> Any:
        """A zip called invoice.pdf is looked into; with by_content off it is not."""
        data = zip_of({"invoice.exe": EXE})
        port = self.server()
        got = yield send(port, message(part("invoice.pdf", "application/pdf", data)))
        self.assertRefused(got, "Message contains disallowed file extension (exe)")
        port = self.server("[archive]\nby_content=false\n")
        got = yield send(port, message(part("invoice.pdf", "application/pdf", data)))
        self.assertEqual(got, (250, b""))

    @inlineCallbacks
    def test_an_encrypted_archive_is_refused_unless_allowed(self) -> Any:
        """Refused by default. With allow_encrypted its names are still checked (they are
        not encrypted), and the archive inside it, which cannot be read, is let be."""
        sealed = encrypted_zip({"report.txt": b"numbers", "more.zip": zip_of({"a": b""})})
        port = self.server()
        got = yield send(port, message(part("secret.zip", "application/zip", sealed)))
        self.assertRefused(got, "Message contains encrypted archive")
        port = self.server("[archive]\nallow_encrypted=true\n")
        got = yield send(port, message(part("secret.zip", "application/zip", sealed)))
        self.assertEqual(got, (250, b""))
        self.assertEqual(
            KEPT[0][0]["attachment_archive_files"], ["secret.zip/report.txt", "secret.zip/more.zip"]
        )
        sealed = encrypted_zip({"run.exe": EXE})
        got = yield send(port, message(part("secret.zip", "application/zip", sealed)))
        self.assertEqual(got, (550, b"5.7.1 Message contains disallowed file extension (exe)"))

    @inlineCallbacks
    def test_nesting_deeper_than_max_depth_is_refused(self) -> Any:
        """The outermost archive is level 0; one at level max_depth is refused."""
        port = self.server("[archive]\nmax_depth=3\n")
        got = yield send(port, message(part("n.zip", "application/zip", nested_zip(3, {}))))
        self.assertEqual(got, (250, b""))
        got = yield send(port, message(part("n.zip", "application/zip", nested_zip(4, {}))))
        self.assertRefused(got, "Message contains nested archives exceeding the maximum depth")

    @inlineCallbacks
    def test_a_decompression_bomb_is_refused(self) -> Any:
        """20 MB of zeros in a 20 KB zip, against a 5 MB budget: refused."""
        bomb = zip_of({"zeros.bin": bytes(20 << 20)}, deflate=True)
        self.assertLess(len(bomb), 30_000)
        port = self.server("[archive]\nmax_total_bytes=5000000\n")
        got = yield send(port, message(part("b.zip", "application/zip", bomb)))
        self.assertRefused(
            got, "Message contains an archive whose decompressed size exceeds the limit"
        )

    @inlineCallbacks
    def test_too_many_names_are_refused(self) -> Any:
        """Counted over all of a message's archives."""
        port = self.server("[archive]\nmax_total_entries=10\n")
        six = zip_of({f"f{i}.txt": b"" for i in range(6)})
        got = yield send(port, message(part("a.zip", "application/zip", six)))
        self.assertEqual(got[0], 250)
        got = yield send(
            port,
            message(part("a.zip", "application/zip", six), part("b.zip", "application/zip", six)),
        )
        self.assertRefused(got, "Message contains an archive whose entry count exceeds the limit")

    @inlineCallbacks
    def test_an_archive_that_cannot_be_read_is_refused_unless_allowed(self) -> Any:
        """A corrupt zip; a zip holding a nested archive twice under one name (neither can
        be looked into alone). With allow_unreadable they go on, noted in the results."""
        broken = b"PK\x03\x04" + b"garbage" * 40
        twice = _zip_with_twins("a.zip", zip_of({"x.exe": EXE}), zip_of({"f.txt": b""}))
        port = self.server()
        for name, data in (("broken.zip", broken), ("twice.zip", twice)):
            got = yield send(port, message(part(name, "application/zip", data)))
            self.assertRefused(got, "Message contains an archive that cannot be read")
        port = self.server("[archive]\nallow_unreadable=true\n")
        got = yield send(port, message(part("broken.zip", "application/zip", broken)))
        self.assertEqual(got, (250, b""))
        (error,) = KEPT[0][1]["err"]
        self.assertTrue(error.startswith("broken.zip: bsdtar could not list it"), error)

    @inlineCallbacks
    def test_a_lone_compressed_file_holds_what_its_name_says(self) -> Any:
        """invoice.exe.gz is no archive to bsdtar: it holds invoice.exe, refused."""
        port = self.server()
        got = yield send(port, message(part("invoice.exe.gz", "application/gzip", _gz(EXE))))
        self.assertRefused(got, "Message contains disallowed file extension (exe)")
        got = yield send(port, message(part("notes.txt.gz", "application/gzip", _gz(b"hi"))))
        self.assertEqual(got, (250, b""))
        self.assertEqual(KEPT[0][0]["attachment_archive_files"], ["notes.txt.gz/notes.txt"])

    @inlineCallbacks
    def test_names_in_any_script_are_read(self) -> Any:
        """A name bsdtar cannot put in ASCII does not stop the listing (Haraka's ran bsdtar
        with LANG=C, which gave up on the whole archive and let evil.exe through)."""
        port = self.server()
        data = zip_of({"résumé.txt": b"cv", "evil.exe": EXE})
        got = yield send(port, message(part("cv.zip", "application/zip", data)))
        self.assertRefused(got, "Message contains disallowed file extension (exe)")

    @inlineCallbacks
    def test_a_nul_in_a_name_does_not_hide_its_extension(self) -> Any:
        """RFC 2231 lets a name carry %00: evil.exe<NUL>.pdf is evil.exe to a C program."""
        port = self.server()
        named = part(None, "application/octet-stream", EXE).replace(
            "attachment\r\n", "attachment; filename*=utf-8''evil.exe%00.pdf\r\n"
        )
        got = yield send(port, message(named))
        self.assertRefused(got, "Message contains disallowed file extension (exe)")

    @inlineCallbacks
    def test_a_message_refused_before_this_plugin_leaves_no_files(self) -> Any:
        """Without a collection of cycles: reset_transaction removes them."""
        gc.disable()
        self.addCleanup(gc.enable)
        port = self.server(plugins=f"{__name__}:RefuseAll\n")
        data = zip_of({"a.txt": b"x" * 1000})
        got = yield send(port, message(part("a.zip", "application/zip", data)))
        self.assertEqual(got, (550, b"5.7.1 Message denied"))
        self.assertEqual(self.left_behind(), [])

    @inlineCallbacks
    def test_a_file_that_cannot_be_written_is_a_temporary_failure(self) -> Any:
        def full(scan: Any) -> Any:
            raise OSError(28, "No space left on device")

        self.patch(attachment._Scan, "new_file", full)
        port = self.server()
        got = yield send(port, message(part("a.zip", "application/zip", zip_of({"x": b""}))))
        self.assertEqual(got, (450, b"4.7.1 Error unpacking archive"))

    @inlineCallbacks
    def test_out_of_time_is_a_temporary_failure_except_to_a_relay(self) -> Any:
        """No time left to look: 450 4.7.1 Error unpacking archive; a relaying client's
        message goes on, as in Haraka."""
        data = zip_of({"a.txt": b""})
        port = self.server("timeout=0.000001\n")
        got = yield send(port, message(part("a.zip", "application/zip", data)))
        self.assertEqual(got, (450, b"4.7.1 Error unpacking archive"))
        self.assertEqual(self.left_behind(), [])
        port = self.server("timeout=0.000001\n", plugins=f"{__name__}:Relaying\n")
        got = yield send(port, message(part("a.zip", "application/zip", data)))
        self.assertEqual(got, (250, b""))
        self.assertIn("no time left", KEPT[0][1]["err"][0])

    @inlineCallbacks
    def test_a_line_that_is_no_pattern_is_named_and_left_out(self) -> Any:
        """The error names the file and line; the other lines hold."""
        files = {"plugins": f"attachment\nrcpt_to.in_host_list\n{__name__}:Keep\n"}
        files["host_list"] = "example.com\n"
        files["attachment.filename.regex"] = "# names\n([unclosed\n^secret\\.txt$\n"
        server, port = start_server(self, files)
        lines: list[str] = []
        server.log.hook = lambda c, r: lines.append(f"{r.level.name} {r.message}") or True
        plugin = next(p.plugin for p in server.runner.plugins if p.name == "attachment")
        plugin.load()  # (as a reload does; start-up said the same before the hook was set)
        where = server.config.path("attachment.filename.regex")
        self.assertEqual(
            [line for line in lines if line.startswith("ERROR")],
            [
                f"ERROR {where}:2: '([unclosed' is not a regular expression"
                " (unterminated character set at position 1)"
            ],
        )
        got = yield send(port, message(part("secret.txt", "text/plain", b"x")))
        self.assertRefused(got, "Message contains unacceptable attachment (secret.txt)")

    @inlineCallbacks
    def test_without_bsdtar_archives_are_not_looked_into(self) -> Any:
        """The rest of the checks hold; the results say why the archive was not opened."""
        self.patch(attachment, "find_bsdtar", lambda: None)
        port = self.server()
        got = yield send(port, message(part("a.zip", "application/zip", zip_of({"x.exe": EXE}))))
        self.assertEqual(got, (250, b""))
        self.assertEqual(KEPT[0][1]["skip"], ["archives not looked into: no bsdtar"])
        got = yield send(port, message(part("x.exe", "application/octet-stream", EXE)))
        self.assertEqual(got[0], 550)


class UnitTests(SynchronousTestCase):
    def test_extension(self) -> None:
        self.assertEqual(archive.extension("a/b.ZIP"), "zip")
        self.assertEqual(archive.extension("x.exe. "), "exe")
        self.assertEqual(archive.extension("..\\dir\\y.Scr"), "scr")
        self.assertEqual(archive.extension(".bashrc"), "")
        self.assertEqual(archive.extension("README"), "")

    def test_pattern_for_escapes_wildcards(self) -> None:
        self.assertEqual(archive.pattern_for("[a]*?\\.zip"), "\\[a\\]\\*\\?\\\\.zip")

    def test_looks_like_archive(self) -> None:
        self.assertTrue(archive.looks_like_archive(zip_of({"a": b""})))
        tar = tgz_of({})  # gzip: not known by content (a lone .gz is not an archive)
        self.assertFalse(archive.looks_like_archive(tar))
        self.assertTrue(archive.looks_like_archive(bytes(257) + b"ustar"))
        self.assertFalse(archive.looks_like_archive(b"%PDF-1.7"))

    def test_read_settings(self) -> None:
        ini: dict[str, dict[str, Any]] = {"main": {}}
        settings = attachment.read_settings(ini)
        self.assertIn("exe", settings.disallowed)
        self.assertNotIn("zip", settings.disallowed)
        self.assertEqual(settings.max_depth, 10)
        settings = attachment.read_settings(
            {
                "main": {
                    "disallowed_extensions": "",
                    "archive_extensions": ".ZIP .jar",
                    "archive_max_depth": 2,
                    "allow_encrypted_archives": True,
                }
            }
        )
        self.assertEqual(settings.disallowed, frozenset())
        self.assertEqual(settings.extensions, {"zip", "jar"})
        self.assertEqual(settings.max_depth, 2)
        self.assertTrue(settings.allow_encrypted)
        with self.assertRaises(ValueError) as caught:
            attachment.read_settings({"main": {}, "archive": {"max_depth": "deep"}})
        self.assertIn("attachment.ini [archive]", str(caught.exception))

    def test_a_message_that_never_ends_leaves_no_files(self) -> None:
        """A client that leaves in the middle of DATA: its work directory goes with it."""
        base = temp_dir(self)
        self.patch(tempfile, "tempdir", str(base))
        scan = attachment._Scan(attachment.Settings())
        scan.new_file().write_bytes(b"PK")
        (workdir,) = base.iterdir()
        del scan
        gc.collect()
        self.assertFalse(workdir.exists())
