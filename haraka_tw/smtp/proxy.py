"""The PROXY protocol (versions 1 and 2): what a load balancer says before the client does.

A proxy such as HAProxy or an AWS load balancer connects to the server on the client's
behalf and starts the stream with a header that names the real client. Version 1 is one
text line::

    PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\\r\\n

Version 2 is binary: a 12-byte signature, a version/command byte, a family/transport
byte, a 16-bit length, the addresses and then type-length-value extensions (TLVs).

L{parse_proxy_header} reads such a header from the start of a buffer. It is a pure
function over bytes: the caller feeds it everything received so far and gets C{None}
(wait for more), a L{ProxyHeader} (whose C{length} says how many bytes to drop), or a
L{ProxyError}. It rejects as soon as the bytes seen so far cannot begin a valid header,
so a client that is not a proxy is turned away without waiting for a timeout.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyHeader",
    "crc32c",
    "parse_proxy_header",
]

#: The longest version 1 line, CRLF included.
V1_MAX_LENGTH = 107
V1_PREFIX = b"PROXY "
#: The 12 bytes every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/transport, length

# Version 2 field values.
_V2_VERSION = 0x2
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_UNSPEC = 0x0
_FAM_INET = 0x1
_FAM_INET6 = 0x2
_FAM_UNIX = 0x3
_TRANSPORT_STREAM = 0x1
_UNIX_PATH_LENGTH = 108

#: family nibble -> (family name, bytes of the address block)
_V2_FAMILIES: dict[int, tuple[str, int]] = {
    _FAM_INET: ("TCP4", 4 + 4 + 2 + 2),
    _FAM_INET6: ("TCP6", 16 + 16 + 2 + 2),
    _FAM_UNIX: ("UNIX", _UNIX_PATH_LENGTH * 2),
}

#: TLV types with a meaning the parser acts on.
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04

_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_ADDRESS_CHARS = {
    b"TCP4": frozenset(b"0123456789."),
    b"TCP6": frozenset(b"0123456789abcdefABCDEF:."),
}
_V1_ADDRESS_MAX = {b"TCP4": 15, b"TCP6": 45}
_DIGITS = frozenset(b"0123456789")


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header; C{str()} is a short reason for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    @ivar version: 1 or 2.
    @ivar local: True when the header asks for no address override: a version 2 LOCAL
        command (the proxy's own health check), version 1 C{PROXY UNKNOWN}, or version 2
        PROXY with the UNSPEC family. The connection's own endpoints stand.
    @ivar family: C{"TCP4"}, C{"TCP6"}, C{"UNIX"}, or None when C{local}.
    @ivar source_ip: the client's address (normalised text form; a socket path for UNIX).
    @ivar source_port: the client's port (None for UNIX and when C{local}).
    @ivar dest_ip: the address the client connected to, on the proxy.
    @ivar dest_port: the port the client connected to.
    @ivar tlvs: version 2 extensions, type -> value (NOOP padding left out; {} for v1).
    @ivar length: how many bytes at the start of the stream the header took.
    """

    version: int
    local: bool
    family: str | None
    source_ip: str | None
    source_port: int | None
    dest_ip: str | None
    dest_port: int | None
    tlvs: dict[int, bytes] = field(hash=False)
    length: int


def parse_proxy_header(buf: bytes) -> ProxyHeader | None:
    """Parse the PROXY header (version 1 or 2) at the start of C{buf}.

    @param buf: the bytes received so far on the connection (bytes after the header are
        left alone; C{length} of the result says where they start).
    @return: the header, or None when C{buf} is a valid beginning of a header that is not
        complete yet.
    @raise ProxyError: if C{buf} does not start with a valid header, or cannot be
        completed into one. (So a buffer never grows past the longest header, 16 + 65,535
        bytes, without an answer: a version 2 header is complete by then.)
    """
    if buf[:1] == V1_PREFIX[:1]:
        return _parse_v1(buf)
    return _parse_v2(buf)


# -- version 1 ------------------------------------------------------------------------


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    head = bytes(buf[:V1_MAX_LENGTH])
    if not head.startswith(V1_PREFIX[: len(head)]):
        raise ProxyError("not a PROXY header")
    lf = head.find(b"\n")
    if lf < 0:
        if len(head) >= V1_MAX_LENGTH:
            raise ProxyError("v1 line too long")
        if len(head) <= len(V1_PREFIX):
            return None
        body = head[len(V1_PREFIX) :]
        _check_v1_cr(body[:-1])
        if body.endswith(b"\r"):  # only the LF is missing: the line must be whole
            _parse_v1_fields(body[:-1])
        else:
            _check_v1_partial(body)
        return None
    if lf < len(V1_PREFIX) or head[lf - 1 : lf] != b"\r":
        raise ProxyError("v1 line not CRLF-terminated")
    body = head[len(V1_PREFIX) : lf - 1]
    _check_v1_cr(body)
    family, src, dst, sport, dport = _parse_v1_fields(body)
    return ProxyHeader(
        version=1,
        local=family is None,
        family=family,
        source_ip=src,
        source_port=sport,
        dest_ip=dst,
        dest_port=dport,
        tlvs={},
        length=lf + 1,
    )


def _check_v1_cr(body: bytes) -> None:
    if b"\r" in body:
        raise ProxyError("v1 bare CR in line")


_V1Fields = tuple[str | None, str | None, str | None, int | None, int | None]


def _parse_v1_fields(body: bytes) -> _V1Fields:
    """The fields of a whole v1 line after C{"PROXY "}, without its CRLF."""
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        return None, None, None, None, None  # the rest of the line is to be ignored
    parts = body.split(b" ")
    protocol = parts[0]
    if protocol not in _V1_ADDRESS_CHARS:
        raise ProxyError("v1 bad protocol")
    if len(parts) != 5:
        raise ProxyError("v1 wrong number of fields")
    src = _v1_address(protocol, parts[1])
    dst = _v1_address(protocol, parts[2])
    return protocol.decode("ascii"), src, dst, _v1_port(parts[3]), _v1_port(parts[4])


def _check_v1_partial(body: bytes) -> None:
    """Raise unless C{body} (after C{"PROXY "}, no CR or LF yet) can begin a valid line."""
    parts = body.split(b" ")
    protocol = parts[0]
    if len(parts) == 1:  # still inside the protocol word
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyError("v1 bad protocol")
        return
    if protocol == b"UNKNOWN":
        return
    if protocol not in _V1_ADDRESS_CHARS:
        raise ProxyError("v1 bad protocol")
    if len(parts) > 5:
        raise ProxyError("v1 wrong number of fields")
    *whole, last = parts[1:]
    for i, part in enumerate(whole):
        if i < 2:
            _v1_address(protocol, part)
        else:
            _v1_port(part)
    if len(whole) < 2:  # the last field is an address in progress
        if len(last) > _V1_ADDRESS_MAX[protocol] or not set(last) <= _V1_ADDRESS_CHARS[protocol]:
            raise ProxyError("v1 bad address")
    elif last:  # a port in progress: more digits can only make it larger
        _v1_port(last)


def _v1_address(protocol: bytes, text: bytes) -> str:
    if not text or not set(text) <= _V1_ADDRESS_CHARS[protocol]:
        raise ProxyError("v1 bad address")
    try:
        if protocol == b"TCP4":
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyError(f"v1 address is not {protocol.decode('ascii')}") from None


def _v1_port(text: bytes) -> int:
    if not text or not set(text) <= _DIGITS or len(text) > 5:
        raise ProxyError("v1 bad port")
    if text.startswith(b"0") and text != b"0":
        raise ProxyError("v1 port has leading zeros")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyError("v1 bad port")
    return port


# -- version 2 ------------------------------------------------------------------------


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    fixed = bytes(buf[:V2_FIXED_LENGTH])
    signature = fixed[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise ProxyError("bad v2 signature" if fixed[:1] == b"\r" else "not a PROXY header")
    if len(fixed) > len(V2_SIGNATURE):
        if fixed[12] >> 4 != _V2_VERSION:
            raise ProxyError("v2 bad version")
        if (fixed[12] & 0x0F) not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyError("v2 bad command")
    if len(fixed) < V2_FIXED_LENGTH:
        return None
    # LOCAL (and PROXY with UNSPEC/UNSPEC) keep the real endpoints: the receiver must
    # discard the address block, whatever family it claims.
    local = (fixed[12] & 0x0F) == _CMD_LOCAL or fixed[13] == (_FAM_UNSPEC << 4)
    family, transport = fixed[13] >> 4, fixed[13] & 0x0F
    (body_length,) = struct.unpack_from("!H", fixed, 14)
    if not local:
        if family not in _V2_FAMILIES:
            raise ProxyError("v2 bad family")
        if transport != _TRANSPORT_STREAM:
            raise ProxyError("v2 transport is not STREAM")
        if body_length < _V2_FAMILIES[family][1]:
            raise ProxyError("v2 length too short for its family")
    total = V2_FIXED_LENGTH + body_length
    if len(buf) < total:
        return None
    if local:
        return ProxyHeader(
            version=2,
            local=True,
            family=None,
            source_ip=None,
            source_port=None,
            dest_ip=None,
            dest_port=None,
            tlvs={},
            length=total,
        )
    header = bytes(buf[:total])
    name, address_length = _V2_FAMILIES[family]
    block = header[V2_FIXED_LENGTH : V2_FIXED_LENGTH + address_length]
    tlvs = _parse_tlvs(header, V2_FIXED_LENGTH + address_length)
    sport: int | None = None
    dport: int | None = None
    if family == _FAM_INET:
        src, dst = _ip_text(block[0:4]), _ip_text(block[4:8])
        sport, dport = struct.unpack_from("!HH", block, 8)
    elif family == _FAM_INET6:
        src, dst = _ip_text(block[0:16]), _ip_text(block[16:32])
        sport, dport = struct.unpack_from("!HH", block, 32)
    else:
        src, dst = _unix_path(block[:_UNIX_PATH_LENGTH]), _unix_path(block[_UNIX_PATH_LENGTH:])
    return ProxyHeader(
        version=2,
        local=False,
        family=name,
        source_ip=src,
        source_port=sport,
        dest_ip=dst,
        dest_port=dport,
        tlvs=tlvs,
        length=total,
    )


def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _unix_path(raw: bytes) -> str:
    path = raw.split(b"\0", 1)[0]
    if any(byte < 0x20 or byte == 0x7F for byte in path):
        raise ProxyError("a UNIX address with control bytes")
    return path.decode("utf-8", "backslashreplace")


def _parse_tlvs(header: bytes, start: int) -> dict[int, bytes]:
    """The TLVs from C{start} to the end of C{header}; checks a CRC32C TLV if present."""
    tlvs: dict[int, bytes] = {}
    pos = start
    while pos < len(header):
        if pos + 3 > len(header):
            raise ProxyError("v2 TLV truncated")
        kind = header[pos]
        (size,) = struct.unpack_from("!H", header, pos + 1)
        value_at = pos + 3
        if value_at + size > len(header):
            raise ProxyError("v2 TLV truncated")
        value = header[value_at : value_at + size]
        if kind == PP2_TYPE_CRC32C:
            _check_crc(header, value_at, value)
        if kind != PP2_TYPE_NOOP:
            if kind in tlvs:
                raise ProxyError("v2 duplicate TLV")
            tlvs[kind] = value
        pos = value_at + size
    return tlvs


def _check_crc(header: bytes, value_at: int, value: bytes) -> None:
    if len(value) != 4:
        raise ProxyError("v2 bad CRC32C TLV")
    zeroed = header[:value_at] + b"\0\0\0\0" + header[value_at + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyError("v2 CRC32C mismatch")


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli, bit-reversed
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """The CRC-32C (Castagnoli) checksum of C{data}, as the PP2_TYPE_CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
