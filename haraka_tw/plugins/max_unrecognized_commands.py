"""max_unrecognized_commands: Haraka's older plugin, now the C{[unrecognized_commands]}
part of L{limit<haraka_tw.plugins.limit>}, always on when listed.

A connection that sends more than the limit of unrecognized commands gets
DENYSOFTDISCONNECT "Too many unrecognized commands" (C{421}, and the connection closes).
The limit is the C{max_unrecognized_commands} value file (Haraka's old config) when
present, else limit.ini C{[unrecognized_commands] max}, else 10. Both are re-read when they
change. List it after the plugins that answer commands of their own (tls, auth).
"""

from __future__ import annotations

from zope.interface import implementer

from haraka_tw.codes import CONT, DENYSOFTDISCONNECT, Code
from haraka_tw.interfaces import IPluginContext, IRegistration, IUnrecognizedCommandHook
from haraka_tw.plugins.limit import (
    BOOLEANS,
    DEFAULT_MAX,
    TOO_MANY_UNRECOGNIZED,
    count_unrecognized,
    parse_limit,
)
from haraka_tw.smtp.connection import Connection

__all__ = ["Plugin"]


@implementer(IRegistration, IUnrecognizedCommandHook)
class Plugin:
    name = "max_unrecognized_commands"

    def __init__(self) -> None:
        self.limit = DEFAULT_MAX["unrecognized_commands"]

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.load()
        context.config.on_change("max_unrecognized_commands", self.load)
        context.config.on_change("limit.ini", self.load)

    def load(self) -> None:
        """(Re)read the limit; a bad value raises and changes nothing."""
        value = self.config.get_value("max_unrecognized_commands", None)
        if value is not None:
            self.limit = parse_limit(value, "the max_unrecognized_commands file")
            return
        section = self.config.get_ini("limit.ini", booleans=BOOLEANS).get(
            "unrecognized_commands", {}
        )
        self.limit = parse_limit(
            section.get("max", DEFAULT_MAX["unrecognized_commands"]),
            "limit.ini [unrecognized_commands] max",
        )

    def hook_unrecognized_command(
        self, connection: Connection, verb: str, argument: str
    ) -> Code | tuple[Code, str]:
        if not self.limit or count_unrecognized(connection, self.name, verb) <= self.limit:
            return CONT
        connection.results.add(self.name, fail="unrec_cmds.max")
        return DENYSOFTDISCONNECT, TOO_MANY_UNRECOGNIZED
