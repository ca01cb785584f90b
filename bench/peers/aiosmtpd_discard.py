"""aiosmtpd with a discard handler. Run: python aiosmtpd_discard.py PORT (with the python of
bench/.tools/venv-aiosmtpd).

The server runs on the main thread's asyncio loop (not aiosmtpd's Controller thread).
``hostname`` is given, so aiosmtpd does not call socket.getfqdn() (a DNS lookup) for every
connection: the bench machine may have no nameserver.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiosmtpd.smtp import SMTP


class Discard:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench.local"), host="127.0.0.1", port=port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
