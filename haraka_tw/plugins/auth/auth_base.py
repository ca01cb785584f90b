"""auth_base: what every auth plugin shares. Not a plugin by itself: subclass L{AuthPlugin}
and give it a C{twisted.cred} checker (see C{flat_file}, C{auth_proxy}, C{auth_bridge}).

The EHLO keyword. C{AUTH <methods>} is advertised only on a TLS connection, unless the
plugin's ini sets C{[core] allow_cleartext=true}. (Haraka's auth_base also waits for TLS;
its flat_file additionally offers AUTH in cleartext to private addresses. haraka_tw does
not guess: cleartext is all or nothing.)

The exchange (an C{unrecognized_command} answer; the client's responses are read with
C{connection.read_line()}, never parsed as commands):

- C{AUTH PLAIN [initial-response]}: the authzid must be empty or the username itself,
  unless the checker provides L{IAuthorizingChecker} and allows it;
- C{AUTH LOGIN [initial-response]}: 334 prompts for the username, then the password;
- C{AUTH CRAM-MD5}: a 334 challenge C{<random.time@me>}, the answer C{user hex-hmac}.

Replies: 235 2.7.0 on success; 535 5.7.8 on failure, after a delay that doubles with each
failure on the connection (1 s, 2 s, 4 s, ... up to C{max_delay}, and below the plugin's
timeout), and after C{max_failures} failures a 421 4.7.0 and the connection is closed (as
Postfix does on its error limit); C{*} in answer to a challenge 501 5.7.0; a response that
does not decode 501 5.5.2; an unknown or disabled mechanism 504 5.5.4; AUTH before EHLO,
after a successful AUTH or inside a transaction 503 5.5.1; AUTH in cleartext where it is not
allowed 538 5.7.11; a checker that cannot reach its backend 454 4.7.0.

On success: C{connection.relaying = True}; C{connection.notes.auth_user} (the identity
authenticated, or the authzid it may act as), C{auth_method}, and C{auth_passwd} (the
password, for prevent_credential_leaks and for relaying onwards; not for CRAM-MD5, and never
when C{blankout_password=true}). It lives in memory for the connection and is never logged;
set C{blankout_password} if no plugin of yours needs it. Results go under C{auth} (pass,
method, user), C{relay} and the plugin's name.

constrain_sender (a mail hook): when on and the authenticated user is C{name@domain}, a
MAIL FROM whose domain is neither that domain nor a subdomain of it is refused with
550 5.7.1. The null sender and users without a domain are not constrained. (Haraka
compares organizational domains through the public suffix list; haraka_tw has none, so
C{user@example.com} may send as C{x@mail.example.com} but not the other way round.)

Config, C{[core]} of the plugin's ini: C{methods} (comma separated), C{allow_cleartext},
C{constrain_sender}, C{max_failures} (0: never disconnect), C{max_delay} (seconds),
C{blankout_password}.

Logging names users, never passwords or responses.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import Attribute, Interface, implementer

from haraka_tw.codes import CONT, DENY, OK, Code
from haraka_tw.interfaces import (
    ICapabilitiesHook,
    IMailHook,
    IPluginContext,
    IRegistration,
    IUnrecognizedCommandHook,
)
from haraka_tw.plugins.auth.sasl import (
    CRAM_MD5,
    LOGIN,
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
    MECHANISMS,
    PLAIN,
    AuthCancelled,
    CramMD5Credentials,
    MalformedResponse,
    PasswordCredentials,
    decode_response,
    encode_challenge,
    parse_plain,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection
from haraka_tw.smtp.replies import Reply

__all__ = [
    "S235_OK",
    "S421_TOO_MANY_FAILURES",
    "S454_UNAVAILABLE",
    "S501_CANCELLED",
    "S501_MALFORMED",
    "S501_SYNTAX",
    "S503_ALREADY",
    "S503_EHLO_FIRST",
    "S503_IN_TRANSACTION",
    "S504_MECHANISM",
    "S535_FAILED",
    "S538_ENCRYPTION_REQUIRED",
    "AuthCredentials",
    "AuthPlugin",
    "AuthRealm",
    "AuthSettings",
    "AuthUnavailable",
    "AuthenticatedUser",
    "IAuthenticatedUser",
    "IAuthorizingChecker",
    "domain_allowed",
    "failure_delay",
    "read_settings",
]

# -- the replies -----------------------------------------------------------------------

S235_OK = Reply(235, "2.7.0", ("Authentication successful",))
S421_TOO_MANY_FAILURES = Reply(
    421, "4.7.0", ("Too many failed authentication attempts, closing connection",)
)
S454_UNAVAILABLE = Reply(454, "4.7.0", ("Temporary authentication failure",))
S501_CANCELLED = Reply(501, "5.7.0", ("Authentication aborted",))
S501_MALFORMED = Reply(501, "5.5.2", ("Cannot decode the authentication response",))
S501_SYNTAX = Reply(501, "5.5.4", ("Syntax: AUTH mechanism [initial-response]",))
S503_ALREADY = Reply(503, "5.5.1", ("Already authenticated",))
S503_EHLO_FIRST = Reply(503, "5.5.1", ("Send EHLO first",))
S503_IN_TRANSACTION = Reply(503, "5.5.1", ("AUTH not permitted during a mail transaction",))
S504_MECHANISM = Reply(504, "5.5.4", ("Unrecognized authentication type",))
S535_FAILED = Reply(535, "5.7.8", ("Authentication failed",))
S538_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", ("Encryption required for requested authentication mechanism",)
)

# -- twisted.cred: what a login yields, and what a checker may add ---------------------


class IAuthenticatedUser(Interface):
    """The avatar an auth portal hands out: who the client now is."""

    name = Attribute("The user name (str).")


@implementer(IAuthenticatedUser)
@dataclass(frozen=True)
class AuthenticatedUser:
    name: str


@implementer(IRealm)
class AuthRealm:
    """Turns the avatar id a checker returns (the username, bytes) into an
    L{AuthenticatedUser}."""

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], AuthenticatedUser, Callable[[], None]]:
        if IAuthenticatedUser not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("the auth realm only hands out IAuthenticatedUser")
        return IAuthenticatedUser, AuthenticatedUser(avatarId.decode("utf-8")), lambda: None


class IAuthorizingChecker(ICredentialsChecker):
    """A checker that lets some users act as others (PLAIN's authzid, RFC 4616)."""

    def may_act_as(avatar_id: bytes, authzid: bytes) -> bool:
        """Whether the user C{avatar_id}, once authenticated, may act as C{authzid}."""


class AuthUnavailable(Exception):
    """A checker could not reach what it checks against (answered 454 4.7.0)."""


# -- settings and policies -------------------------------------------------------------

#: The boolean keys of C{[core]}; a subclass decides constrain_sender's default.
BOOLEANS = ("-core.allow_cleartext", "-core.blankout_password")

_METHOD_SEPARATORS = re.compile(r"[\s,;]+")


@dataclass(frozen=True)
class AuthSettings:
    """The C{[core]} section of an auth plugin's ini."""

    methods: tuple[str, ...] = MECHANISMS
    allow_cleartext: bool = False
    constrain_sender: bool = True
    max_failures: int = 3
    max_delay: float = 16.0
    blankout_password: bool = False


def read_settings(
    core: Mapping[str, Any], *, supported: tuple[str, ...], default_methods: tuple[str, ...]
) -> AuthSettings:
    """The settings of a C{[core]} section (booleans already converted by the reader).

    @raise ValueError: for a method the plugin cannot offer, or a bad number.
    """
    raw = core.get("methods")
    if raw is None or raw is True or raw == "":
        methods = default_methods
    else:
        methods = tuple(dict.fromkeys(m.upper() for m in _METHOD_SEPARATORS.split(str(raw)) if m))
    unknown = [m for m in methods if m not in supported]
    if unknown:
        raise ValueError(
            f"methods: cannot offer {', '.join(unknown)} (can: {', '.join(supported)})"
        )
    max_failures = _number(core, "max_failures", 3)
    max_delay = _number(core, "max_delay", 16)
    if max_failures < 0 or max_delay < 0 or int(max_failures) != max_failures:
        raise ValueError("max_failures must be a whole number >= 0 and max_delay >= 0")
    return AuthSettings(
        methods=methods,
        allow_cleartext=bool(core.get("allow_cleartext", False)),
        constrain_sender=bool(core.get("constrain_sender", True)),
        max_failures=int(max_failures),
        max_delay=float(max_delay),
        blankout_password=bool(core.get("blankout_password", False)),
    )


def _number(core: Mapping[str, Any], key: str, default: float) -> float:
    value = core.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, not {value!r}")
    return float(value)


def failure_delay(failures: int, cap: float) -> float:
    """Seconds to wait before answering the C{failures}-th failure: 1, 2, 4, ... <= C{cap}."""
    if failures <= 0:
        return 0.0
    return float(min(2.0 ** min(failures - 1, 62), cap))


def domain_allowed(sender_domain: str, user_domain: str) -> bool:
    """Whether an envelope domain belongs to the user's: the same, or a subdomain of it."""
    sender = sender_domain.lower().rstrip(".")
    user = user_domain.lower().rstrip(".")
    return bool(user) and (sender == user or sender.endswith("." + user))


# -- the plugin ------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client left in the middle of the exchange."""


#: What the mechanisms produce for the portal.
AuthCredentials = PasswordCredentials | CramMD5Credentials


@implementer(IRegistration, ICapabilitiesHook, IUnrecognizedCommandHook, IMailHook)
class AuthPlugin:
    """The AUTH command for one checker. Subclasses set the class attributes and
    implement L{make_checker}; they may extend L{authenticated}."""

    name = "auth"
    #: The ini file with C{[core]} (and whatever the subclass reads).
    config_file: ClassVar[str] = ""
    #: The mechanisms this plugin's checker can verify, and those offered by default.
    supported_methods: ClassVar[tuple[str, ...]] = MECHANISMS
    default_methods: ClassVar[tuple[str, ...]] = MECHANISMS
    #: Haraka turns constrain_sender on in flat_file and leaves it off in auth_proxy.
    constrain_sender_default: ClassVar[bool] = True
    #: More boolean keys the subclass reads (declarations as for C{get_ini}).
    extra_booleans: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reactor: Any = None) -> None:
        # The plugin loader calls the factory with no arguments and gives the server's
        # reactor at registration; a test may pass a Clock here instead.
        self.reactor: Any = reactor
        self.settings = AuthSettings()
        self.portal = Portal(AuthRealm())

    @property
    def clock(self) -> IReactorTime:
        """What the failure delay waits on."""
        clock: IReactorTime = self.reactor
        return clock

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        if self.reactor is None:
            self.reactor = getattr(context, "reactor", None)
        if self.reactor is None:
            from twisted.internet import reactor as global_reactor

            self.reactor = global_reactor
        self.config = context.config
        self.log = context.log
        self.load()
        for name in self.watched_files():
            context.config.on_change(name, self.load)

    def watched_files(self) -> tuple[str, ...]:
        """The config files whose change reloads the plugin."""
        return (self.config_file,)

    def read_ini(self) -> dict[str, dict[str, Any]]:
        """The plugin's ini, with the booleans of C{[core]} declared."""
        sign = "+" if self.constrain_sender_default else "-"
        booleans = (*BOOLEANS, f"{sign}core.constrain_sender", *self.extra_booleans)
        ini: dict[str, dict[str, Any]] = self.config.get_ini(self.config_file, booleans=booleans)
        return ini

    def load(self) -> None:
        """(Re)read the config and build the portal; a bad config raises and changes
        nothing."""
        ini = self.read_ini()
        settings = read_settings(
            ini.get("core", {}),
            supported=self.supported_methods,
            default_methods=self.default_methods,
        )
        portal = Portal(AuthRealm(), [self.make_checker(ini)])
        self.settings, self.portal = settings, portal

    def make_checker(self, ini: dict[str, dict[str, Any]]) -> ICredentialsChecker:
        """The checker for the credentials, from the plugin's ini."""
        raise NotImplementedError

    # -- EHLO ------------------------------------------------------------------------

    def offered(self, connection: Connection) -> bool:
        """Whether AUTH may be used on this connection (TLS, or cleartext allowed)."""
        return connection.tls.enabled or self.settings.allow_cleartext

    def hook_capabilities(self, connection: Connection) -> None:
        if not self.settings.methods:
            return
        if not self.offered(connection):
            self.log.debug("AUTH not offered: not TLS", connection)
            return
        if any(c.upper().startswith("AUTH ") for c in connection.capabilities):
            return  # another auth plugin came first; it answers AUTH
        connection.capabilities.append("AUTH " + " ".join(self.settings.methods))
        connection.notes["allowed_auth_methods"] = list(self.settings.methods)

    # -- AUTH ------------------------------------------------------------------------

    def hook_unrecognized_command(
        self, connection: Connection, verb: str, argument: str
    ) -> Code | Deferred[Code]:
        if verb != "AUTH":
            return CONT
        return Deferred.fromCoroutine(self.authenticate(connection, argument))

    def refusal(self, connection: Connection) -> Reply | None:
        """Why AUTH cannot start now, or None."""
        if not connection.esmtp:
            return S503_EHLO_FIRST
        if not self.offered(connection):
            return S538_ENCRYPTION_REQUIRED
        if connection.notes.get("auth_user"):
            return S503_ALREADY
        if connection.transaction is not None:
            return S503_IN_TRANSACTION
        return None

    async def authenticate(self, connection: Connection, argument: str) -> Code:
        """The whole exchange for one AUTH command; every reply is sent here."""
        refusal = self.refusal(connection)
        words = argument.split()
        if refusal is None and not 1 <= len(words) <= 2:
            refusal = S501_SYNTAX
        if refusal is None and words[0].upper() not in self.settings.methods:
            refusal = S504_MECHANISM
        if refusal is not None:
            _reply(connection, refusal)
            return OK
        mechanism = words[0].upper()
        initial = words[1].encode("utf-8") if len(words) == 2 else None
        try:
            credentials = await self._exchanges[mechanism](self, connection, initial)
        except AuthCancelled:
            _reply(connection, S501_CANCELLED)
            return OK
        except MalformedResponse as e:
            self.log.info(f"AUTH {mechanism}: malformed response ({e})", connection)
            _reply(connection, S501_MALFORMED)
            return OK
        except _ClientGone:
            return OK
        await self.verify(connection, mechanism, credentials)
        return OK

    async def ask(self, connection: Connection, challenge: str) -> bytes:
        """Send C{334 challenge}; the client's answer, decoded."""
        connection.respond(334, challenge)
        try:
            line = await connection.read_line()
        except (ConnectionError, net_error.ConnectionClosed) as e:
            raise _ClientGone() from e
        return decode_response(line)

    async def _plain(self, connection: Connection, initial: bytes | None) -> AuthCredentials:
        data = decode_response(initial) if initial is not None else await self.ask(connection, "")
        authzid, authcid, password = parse_plain(data)
        return PasswordCredentials(authcid, password, authzid)

    async def _login(self, connection: Connection, initial: bytes | None) -> AuthCredentials:
        if initial is not None:
            username = decode_response(initial)
        else:
            username = await self.ask(connection, LOGIN_USERNAME_PROMPT)
        password = await self.ask(connection, LOGIN_PASSWORD_PROMPT)
        if not username or not password:
            raise MalformedResponse("LOGIN needs a username and a password")
        for value in (username, password):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedResponse("not UTF-8") from None
        return PasswordCredentials(username, password)

    async def _cram_md5(self, connection: Connection, initial: bytes | None) -> AuthCredentials:
        if initial is not None:  # the server speaks first (RFC 4954 4: 501)
            raise MalformedResponse("CRAM-MD5 takes no initial response")
        credentials = CramMD5Credentials(connection.local.host)
        answer = await self.ask(connection, encode_challenge(credentials.challenge))
        credentials.set_response(answer)
        return credentials

    _exchanges: ClassVar[
        dict[str, Callable[[AuthPlugin, Connection, bytes | None], Awaitable[AuthCredentials]]]
    ] = {PLAIN: _plain, LOGIN: _login, CRAM_MD5: _cram_md5}

    async def verify(
        self, connection: Connection, mechanism: str, credentials: AuthCredentials
    ) -> None:
        """Check the credentials through the portal, and answer."""
        username = (credentials.username or b"").decode("utf-8")
        authzid = getattr(credentials, "authzid", b"")
        acting_as = authzid.decode("utf-8") if authzid and authzid != credentials.username else ""
        try:
            if acting_as and not IAuthorizingChecker.providedBy(self._checker_for(credentials)):
                raise cred_error.UnauthorizedLogin("authzid differs from the username")
            _, avatar, _ = await self.portal.login(credentials, connection, IAuthenticatedUser)
            if acting_as:
                checker = self._checker_for(credentials)
                if not checker.may_act_as(credentials.username, authzid):
                    raise cred_error.UnauthorizedLogin(f"may not act as {acting_as!r}")
        except cred_error.UnauthorizedLogin as e:
            await self.failed(connection, mechanism, username, str(e))
            return
        except AuthUnavailable as e:
            self.log.warn(f"AUTH {mechanism} user={username!r}: unavailable: {e}", connection)
            connection.results.add("auth", err=f"{self.name}/{mechanism}")
            _reply(connection, S454_UNAVAILABLE)
            return
        except Exception as e:
            self.log.error(
                f"AUTH {mechanism} user={username!r}: checker error {type(e).__name__}: {e}",
                connection,
            )
            connection.results.add("auth", err=f"{self.name}/{mechanism}")
            _reply(connection, S454_UNAVAILABLE)
            return
        user = acting_as or (avatar.name if isinstance(avatar, AuthenticatedUser) else username)
        password = credentials.password if isinstance(credentials, PasswordCredentials) else None
        self.succeeded(connection, mechanism, user, password)
        self.authenticated(connection, mechanism, user, credentials)
        _reply(connection, S235_OK)

    def _checker_for(self, credentials: ICredentials) -> Any:
        for iface, checker in self.portal.checkers.items():
            if iface.providedBy(credentials):
                return checker
        return None

    def succeeded(
        self, connection: Connection, mechanism: str, user: str, password: bytes | None
    ) -> None:
        """Record a successful AUTH on the connection."""
        connection.relaying = True
        connection.notes["auth_user"] = user
        connection.notes["auth_method"] = mechanism
        if password is not None and not self.settings.blankout_password:
            connection.notes["auth_passwd"] = password.decode("utf-8")
        connection.results.add("auth", **{"pass": self.name, "method": mechanism, "user": user})
        connection.results.add("relay", **{"pass": self.name})
        connection.results.add(self.name, **{"pass": mechanism})
        self.log.info(f"AUTH {mechanism} user={user!r} succeeded", connection)

    def authenticated(
        self, connection: Connection, mechanism: str, user: str, credentials: AuthCredentials
    ) -> None:
        """Called after a success is recorded, before the 235 (auth_bridge keeps the
        credentials here)."""

    async def failed(self, connection: Connection, mechanism: str, user: str, why: str) -> None:
        """A failure: wait (doubling per failure), 535, and 421 at the limit."""
        failures = int(connection.notes.get("auth_fails", 0)) + 1
        connection.notes["auth_fails"] = failures
        connection.results.add("auth", fail=f"{self.name}/{mechanism}")
        delay = failure_delay(failures, self.delay_cap())
        self.log.notice(
            f"AUTH {mechanism} user={user!r} failed ({why}); failure {failures}, "
            f"delaying {delay:g}s",
            connection,
        )
        if delay > 0:
            await deferLater(self.clock, delay)
        _reply(connection, S535_FAILED)
        limit = self.settings.max_failures
        if limit and failures >= limit:
            self.log.notice(f"{failures} failed AUTH attempts: disconnecting", connection)
            _reply(connection, S421_TOO_MANY_FAILURES)
            connection.disconnect()

    def delay_cap(self) -> float:
        """C{max_delay}, kept a second below the plugin's timeout (as Haraka does), so the
        delay never turns into a plugin timeout."""
        cap = self.settings.max_delay
        timeout = self.config.get_value(f"{self.name}.timeout", None)
        if timeout is None:
            timeout = self.config.get_value("plugin_timeout", 30)
        try:
            seconds = float(timeout)
        except (TypeError, ValueError):
            return cap
        return cap if seconds <= 0 else max(0.0, min(cap, seconds - 1))

    # -- MAIL ------------------------------------------------------------------------

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> Code | tuple[Code, str]:
        """constrain_sender: an authenticated user sends only from their own domain."""
        if not self.settings.constrain_sender:
            return CONT
        user = connection.notes.get("auth_user")
        if not isinstance(user, str) or "@" not in user:
            return CONT
        if sender.is_null or not sender.domain:
            return CONT
        user_domain = user.rpartition("@")[2]
        if domain_allowed(sender.domain, user_domain):
            return CONT
        connection.results.add(self.name, fail="constrain_sender")
        return DENY, f"Envelope domain '{sender.domain}' doesn't match AUTH domain '{user_domain}'"


def _reply(connection: Connection, reply: Reply) -> None:
    connection.respond(reply.code, list(reply.lines), reply.enhanced)
