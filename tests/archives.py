"""Archives for the attachment tests, made here: zips (one nested in another, as deep as
asked), a tar.gz, and a zip encrypted with the traditional PKWARE cipher (which Python's
zipfile reads but does not write), so that bsdtar meets the real thing."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Mapping

__all__ = ["encrypted_zip", "nested_zip", "tgz_of", "zip_of"]


def zip_of(members: Mapping[str, bytes], *, deflate: bool = False) -> bytes:
    """A zip holding C{members} (name: content)."""
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def nested_zip(levels: int, inner: Mapping[str, bytes]) -> bytes:
    """C{inner} in a zip, that zip in another, ... C{levels} zips in all (the outermost
    is level 0); each holds the next as C{level<N>.zip}."""
    data = zip_of(inner)
    for level in range(levels - 1, 0, -1):
        data = zip_of({f"level{level}.zip": data})
    return data


def tgz_of(members: Mapping[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _crc_step(crc: int, byte: int) -> int:
    return zlib.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _zipcrypto(data: bytes, password: bytes, crc: int) -> bytes:
    """C{data} encrypted with PKWARE's traditional cipher (APPNOTE 6.1), behind its
    12-byte header whose last byte is the CRC's high byte."""
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(byte: int) -> None:
        keys[0] = _crc_step(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = _crc_step(keys[2], keys[1] >> 24)

    for byte in password:
        update(byte)
    out = bytearray()
    for byte in os.urandom(11) + bytes([crc >> 24]) + data:
        temp = (keys[2] | 2) & 0xFFFF
        out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        update(byte)
    return bytes(out)


def encrypted_zip(members: Mapping[str, bytes], password: bytes = b"secret") -> bytes:
    """A zip whose members are stored encrypted with C{password}."""
    out = io.BytesIO()
    central = []
    for name, data in members.items():
        encoded, crc = name.encode(), zlib.crc32(data)
        sealed = _zipcrypto(data, password, crc)
        offset = out.tell()
        local = (0x04034B50, 20, 1, 0, 0, 0, crc, len(sealed), len(data), len(encoded), 0)
        out.write(struct.pack("<IHHHHHIIIHH", *local) + encoded + sealed)
        entry = (0x02014B50, 20, 20, 1, 0, 0, 0, crc, len(sealed), len(data), len(encoded))
        central.append(
            struct.pack("<IHHHHHHIIIH", *entry) + bytes(12) + struct.pack("<I", offset) + encoded
        )
    directory = b"".join(central)
    start = out.tell()
    out.write(directory)
    count = len(central)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), start, 0))
    return out.getvalue()
