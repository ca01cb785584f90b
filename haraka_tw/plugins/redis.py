"""redis: the server's shared Redis connection (Haraka's C{redis} plugin), from redis.ini.

Listing it makes the connection when the server starts (and logs whether Redis answers);
plugins that keep state in Redis (greylist) use the same client, from
L{haraka_tw.redis.shared_client}, whether or not this plugin is listed. A plugin of your
own gets it the same way: C{shared_client(context).execute("INCR", key)}.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from haraka_tw.interfaces import IPluginContext, IRegistration, IShutdown
from haraka_tw.redis import RedisClient, shared_client

__all__ = ["Plugin"]


@implementer(IRegistration, IShutdown)
class Plugin:
    name = "redis"

    def __init__(self) -> None:
        self.client: RedisClient | None = None

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        self.client = shared_client(context)
        client = self.client

        def answered(reply: Any) -> None:
            self.log.info(f"connected to Redis at {client.host}:{client.port}/{client.db}")

        def failed(failure: Any) -> None:
            self.log.error(f"{failure.getErrorMessage()} (commands fail until it answers)")

        client.connect().addCallbacks(answered, failed)

    def shutdown(self) -> None:
        """Close the connection (the sessions have ended)."""
        if self.client is not None:
            self.client.close()
