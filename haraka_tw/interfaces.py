"""The plugin contract: one zope interface per hook, and the registration interface.

A plugin is any object that provides one or more of the ``I<Name>Hook`` interfaces below
(usually by ``@implementer(IMailHook, IRcptHook)`` on its class). The hook runner calls a
plugin for a hook only when ``IXxxHook.providedBy(plugin)``; it never guesses method names.

Every hook method may return ``None`` (meaning CONT), a L{haraka_tw.codes.Code}, a
``(code, message)`` pair, a L{haraka_tw.codes.HookResult}, or a Deferred or coroutine that
produces one of those. See docs/hooks.md for the codes each hook honours and the replies
they give. An exception raised by a hook is logged with the plugin's name and treated as
CONT.

The C{connection} argument is a L{haraka_tw.smtp.connection.Connection}; its open
transaction, when there is one, is C{connection.transaction}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = [
    "HOOKS",
    "IBounceHook",
    "ICapabilitiesHook",
    "IConnectHook",
    "IConnectInitHook",
    "IDataHook",
    "IDataPostHook",
    "IDeferredHook",
    "IDeliveredHook",
    "IDenyHook",
    "IDisconnectHook",
    "IEhloHook",
    "IGetMxHook",
    "IHeloHook",
    "IInitChildHook",
    "IInitMasterHook",
    "ILogHook",
    "ILookupRdnsHook",
    "IMailHook",
    "IMaxDataExceededHook",
    "INoopHook",
    "IPluginContext",
    "IPreSendTransEmailHook",
    "IQueueHook",
    "IQueueOkHook",
    "IQueueOutboundHook",
    "IQuitHook",
    "IRcptHook",
    "IRcptOkHook",
    "IRegistration",
    "IResetTransactionHook",
    "IRsetHook",
    "ISendEmailHook",
    "IShutdown",
    "IUnrecognizedCommandHook",
    "IVrfyHook",
]


class IPluginContext(Interface):
    """What a plugin is handed at registration."""

    name = Attribute("The plugin's name as the plugins file gives it, e.g. 'queue/maildir'.")
    config = Attribute(
        "The L{haraka_tw.config.ConfigDirectory}: get_value, get_list, get_ini, get_json, ..."
    )
    log = Attribute("A L{haraka_tw.logging.PluginLogger} whose lines carry the plugin's name.")
    server_notes = Attribute("A dict shared by every plugin and connection of this server.")
    reactor = Attribute(
        "The reactor the server runs on (IReactorTime and friends): use it for timers "
        "instead of importing the global reactor, so tests can pass a task.Clock."
    )
    resolver = Attribute(
        "The server's L{haraka_tw.dns.Resolver} (dns.ini; answers cached for their TTL): "
        "lookup_mx, lookup_a, lookup_aaaa, lookup_ptr, lookup_txt, each a Deferred."
    )

    def set_priority(hook: str, priority: int) -> None:
        """Run this plugin's C{hook} at C{priority} (-100 first .. 100 last, default 0).

        Plugins of equal priority keep the order of the plugins file.
        """


class IRegistration(Interface):
    """A plugin that wants its name, config, logger and the server notes."""

    def register(context: IPluginContext) -> None:
        """Called once after the plugin is created, before the server listens.

        @param context: an L{IPluginContext}.
        @raise Exception: any exception stops start-up with a message naming the plugin
            (unless smtp.ini ignore_bad_plugins is set).
        """


class IShutdown(Interface):
    """A plugin with something to stop (timers, connections) when the server stops."""

    def shutdown() -> None:
        """Called once when the service stops, after the listeners have closed, the
        sessions have ended and outbound delivery has stopped."""


# -- Connection phase -------------------------------------------------------------------


class IConnectInitHook(Interface):
    def hook_connect_init(connection):  # type: ignore[no-untyped-def]
        """A client connected (or PROXY/XCLIENT gave its real address).

        Every plugin runs; results are ignored.
        """


class ILookupRdnsHook(Interface):
    def hook_lookup_rdns(connection):  # type: ignore[no-untyped-def]
        """Name the client. OK with a hostname sets C{connection.remote.host}.

        DENY 554 and DENYSOFT 421 answer every later command but QUIT; DENYDISCONNECT and
        DISCONNECT answer 554 and close; DENYSOFTDISCONNECT 421 and close. CONT runs the core
        reverse lookup.
        """


class IConnectHook(Interface):
    def hook_connect(connection):  # type: ignore[no-untyped-def]
        """Decide whether to greet the client; CONT or OK sends the 220 banner.

        DENY 554 / DENYSOFT 421 answer every later command but QUIT; the DISCONNECT
        variants answer 554 / 421 and close.
        """


class ICapabilitiesHook(Interface):
    def hook_capabilities(connection):  # type: ignore[no-untyped-def]
        """Add EHLO keywords to C{connection.capabilities} (a list of str). Runs after ehlo;
        every plugin runs and results are ignored.
        """


class IHeloHook(Interface):
    def hook_helo(connection, host):  # type: ignore[no-untyped-def]
        """HELO C{host} (str). DENY 550, DENYSOFT 450, the DISCONNECT variants close."""


class IEhloHook(Interface):
    def hook_ehlo(connection, host):  # type: ignore[no-untyped-def]
        """EHLO C{host} (str). DENY 550, DENYSOFT 450, the DISCONNECT variants close."""


# -- Transaction phase -----------------------------------------------------------------


class IMailHook(Interface):
    def hook_mail(connection, sender, params):  # type: ignore[no-untyped-def]
        """MAIL FROM. C{sender} is a L{haraka_tw.smtp.address.Address} (null for <>);
        C{params} a dict of upper-cased ESMTP keywords to str values (None for a bare
        keyword). DENY 550, DENYSOFT 450 (the transaction is dropped); CONT or OK 250.
        """


class IRcptHook(Interface):
    def hook_rcpt(connection, recipient, params):  # type: ignore[no-untyped-def]
        """RCPT TO. OK accepts (rcpt_ok runs next); CONT accepts only when the client is
        relaying, else 550 "I cannot deliver mail for <x>"; DENY 550, DENYSOFT 450.
        """


class IRcptOkHook(Interface):
    def hook_rcpt_ok(connection, recipient):  # type: ignore[no-untyped-def]
        """An accepted recipient. DENY 550 / DENYSOFT 450 drop it; else 250."""


class IDataHook(Interface):
    def hook_data(connection):  # type: ignore[no-untyped-def]
        """DATA. DENY 554, DENYSOFT 451, the DISCONNECT variants close; else 354."""


class IDataPostHook(Interface):
    def hook_data_post(connection):  # type: ignore[no-untyped-def]
        """The message is in C{connection.transaction}. DENY 550, DENYSOFT 450; else the
        queue (or queue_outbound when relaying) hook runs.
        """


class IMaxDataExceededHook(Interface):
    def hook_max_data_exceeded(connection):  # type: ignore[no-untyped-def]
        """The message passed connection.ini max.bytes. DENYSOFT 450; else 550."""


class IQueueHook(Interface):
    def hook_queue(connection):  # type: ignore[no-untyped-def]
        """Store an inbound message. OK: stored (queue_ok, then 250); DENY 550; DENYSOFT
        450; CONT (nobody stored it) 451.
        """


class IQueueOutboundHook(Interface):
    def hook_queue_outbound(connection):  # type: ignore[no-untyped-def]
        """Store a relayed message. OK: stored; DENY 550; DENYSOFT 450; CONT hands it to
        the built-in outbound queue when one is configured (until then: 450).
        """


class IQueueOkHook(Interface):
    def hook_queue_ok(connection, message):  # type: ignore[no-untyped-def]
        """The message was queued; C{message} is the reply text. Result ignored."""


class IQuitHook(Interface):
    def hook_quit(connection):  # type: ignore[no-untyped-def]
        """QUIT. Result ignored; 221."""


class IRsetHook(Interface):
    def hook_rset(connection):  # type: ignore[no-untyped-def]
        """RSET (the transaction is already reset). Result ignored; 250."""


class IVrfyHook(Interface):
    def hook_vrfy(connection):  # type: ignore[no-untyped-def]
        """VRFY (its argument is C{connection.current_command.argument}). OK 250, DENY
        550, DENYSOFT 450; else 252.
        """


class INoopHook(Interface):
    def hook_noop(connection):  # type: ignore[no-untyped-def]
        """NOOP. DENY 500, DENYSOFT 450, the DISCONNECT variants close; else 250."""


class IUnrecognizedCommandHook(Interface):
    def hook_unrecognized_command(connection, verb, argument):  # type: ignore[no-untyped-def]
        """A command the core does not know. C{verb} is upper-case str, C{argument} str.

        OK: the plugin replied itself (with C{connection.respond}); HOOK_NEXT with a core
        command's name (e.g. "NOOP") runs that command with this argument; DENY 500;
        DENYDISCONNECT 521 and close; DENYSOFTDISCONNECT 421 and close; CONT 500 and the
        error count goes up.
        """


class IResetTransactionHook(Interface):
    def hook_reset_transaction(connection):  # type: ignore[no-untyped-def]
        """The open transaction is about to end. Every plugin runs; result ignored."""


class IDisconnectHook(Interface):
    def hook_disconnect(connection):  # type: ignore[no-untyped-def]
        """The connection closed. Every plugin runs; results ignored."""


class IDenyHook(Interface):
    def hook_deny(connection, code, message, plugin, method, params, hook):  # type: ignore[no-untyped-def]
        """Another plugin denied: C{code} and C{message} it gave, C{plugin} its name,
        C{method} the method name (e.g. 'hook_rcpt'), C{params} the hook's arguments after
        the connection (a tuple), C{hook} the hook name. OK overrides the denial, and the
        rest of the original hook's chain resumes.
        """


class ILogHook(Interface):
    def hook_log(connection, record):  # type: ignore[no-untyped-def]
        """A log line (C{record} a L{haraka_tw.logging.LogRecord}; C{connection} may be
        None). Must answer synchronously; any result but CONT suppresses the default output.
        """


# -- Process -----------------------------------------------------------------------------


class IInitMasterHook(Interface):
    def hook_init_master(server):  # type: ignore[no-untyped-def]
        """The server starts (the master, when there are workers). Anything but OK or CONT
        stops start-up.
        """


class IInitChildHook(Interface):
    def hook_init_child(server):  # type: ignore[no-untyped-def]
        """A worker process starts. Anything but OK or CONT stops it."""


# -- Outbound (the relay manager; see docs/hooks.md) -------------------------------------


class ISendEmailHook(Interface):
    def hook_send_email(hmail):  # type: ignore[no-untyped-def]
        """A queued message is about to be delivered. DELAY with seconds requeues it."""


class IGetMxHook(Interface):
    def hook_get_mx(hmail, domain):  # type: ignore[no-untyped-def]
        """OK with MX hosts routes the message; DENY bounces 5.1.2; DENYSOFT defers 4.1.2."""


class IDeferredHook(Interface):
    def hook_deferred(hmail, params):  # type: ignore[no-untyped-def]
        """Delivery failed temporarily. CONT retries on schedule; DENYSOFT with seconds
        sets the delay; anything else drops the message.
        """


class IBounceHook(Interface):
    def hook_bounce(hmail, error):  # type: ignore[no-untyped-def]
        """Delivery failed permanently. CONT sends the DSN; anything else drops it."""


class IDeliveredHook(Interface):
    def hook_delivered(hmail, params):  # type: ignore[no-untyped-def]
        """The message was delivered. Result ignored."""


class IPreSendTransEmailHook(Interface):
    def hook_pre_send_trans_email(connection):  # type: ignore[no-untyped-def]
        """A relayed message is about to enter the outbound queue (e.g. to DKIM-sign it)."""


#: hook name -> the interface a plugin provides to answer it, in Haraka's firing order.
HOOKS: dict[str, type[Interface]] = {
    "connect_init": IConnectInitHook,
    "lookup_rdns": ILookupRdnsHook,
    "connect": IConnectHook,
    "helo": IHeloHook,
    "ehlo": IEhloHook,
    "capabilities": ICapabilitiesHook,  # (after a successful ehlo, for its reply)
    "unrecognized_command": IUnrecognizedCommandHook,
    "mail": IMailHook,
    "rcpt": IRcptHook,
    "rcpt_ok": IRcptOkHook,
    "data": IDataHook,
    "data_post": IDataPostHook,
    "max_data_exceeded": IMaxDataExceededHook,
    "queue": IQueueHook,
    "queue_outbound": IQueueOutboundHook,
    "pre_send_trans_email": IPreSendTransEmailHook,
    "queue_ok": IQueueOkHook,
    "reset_transaction": IResetTransactionHook,
    "rset": IRsetHook,
    "vrfy": IVrfyHook,
    "noop": INoopHook,
    "quit": IQuitHook,
    "disconnect": IDisconnectHook,
    "deny": IDenyHook,
    "log": ILogHook,
    "init_master": IInitMasterHook,
    "init_child": IInitChildHook,
    "send_email": ISendEmailHook,
    "get_mx": IGetMxHook,
    "deferred": IDeferredHook,
    "bounce": IBounceHook,
    "delivered": IDeliveredHook,
}
