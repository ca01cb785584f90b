"""A loopback DNS server for the outbound scenario. Run: python dns_server.py PORT.

Every name gets MX 10 ``mx.bench.test.``; ``mx.bench.test.`` (and any other A query) gets
127.0.0.1; other types get an empty NOERROR. So each of the bench's destination domains
resolves to the smtp-sink on loopback (outbound.ini mx_port and local_mx_ok do the rest).
UDP only: the answers are small.
"""

from __future__ import annotations

import socket
import sys

import dns.flags
import dns.message
import dns.rdatatype
import dns.rrset

MX_HOST = "mx.bench.test."


def answer(wire: bytes) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.RA
    for question in query.question:
        if question.rdtype == dns.rdatatype.MX:
            reply.answer.append(
                dns.rrset.from_text(question.name, 300, "IN", "MX", f"10 {MX_HOST}")
            )
        elif question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", "127.0.0.1"))
    return reply.to_wire()


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    while True:
        wire, peer = sock.recvfrom(4096)
        out = answer(wire)
        if out is not None:
            sock.sendto(out, peer)


if __name__ == "__main__":
    main()
