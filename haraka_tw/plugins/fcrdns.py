"""fcrdns: forward-confirmed reverse DNS of the client (Haraka's C{fcrdns}).

Before the banner (lookup_rdns) the client's address is looked up for its names (PTR) and
each name, at most C{MAX_NAMES}, for its addresses (A or AAAA): a name whose addresses
include the client's confirms it (C{pass: fcrdns}); one whose addresses share the client's
IPv4 /24 does too, as in Haraka (C{pass: fcrdns(net)}). The findings go in
C{connection.results["fcrdns"]} with Haraka's keys (C{fcrdns}: the confirming names,
C{ptr_names}, C{ptr_name_to_ip}, C{other_ips}, C{invalid_tlds}, C{has_rdns},
C{ptr_name_has_ips}, C{ptr_multidomain}, C{generic_rdns}), in an Authentication-Results
C{iprev} entry (RFC 8601: pass only for an exact match), and at data_post in
C{X-Haraka-FCrDNS} and C{X-Haraka-rDNS-OtherIPs} header fields (any the client sent are
removed first).

Nothing is refused unless fcrdns.ini says so (C{[reject]}): C{no_rdns} (no name: 554; the
lookup failed: 421), C{no_fcrdns} (no name confirms: 554), C{invalid_tld} (a name without a
top-level domain), C{generic_rdns} (a name holding the client's address, such as
C{c-192-0-2-1.pool.isp.example}, unless "static" or "business" is in it). A client the
C{rdns_access} note marks C{white} is spared every refusal but C{no_fcrdns}, as in
Haraka. Clients on private addresses are not looked up.

Done otherwise than Haraka's plugin: at most C{MAX_NAMES} names are resolved (Haraka
resolves every name a PTR answer holds, at once); a forward lookup that fails is an
error (iprev temperror), not "no address"; addresses are compared as addresses (an IPv6
address written two ways is one); the header fields are added after the client's header
is in, so a copy the client sent cannot pass for ours.

fcrdns.ini::

    timeout=29       ; seconds for the lookups (kept under the hook's own limit)
    [reject]
    no_rdns=false
    no_fcrdns=false
    invalid_tld=false
    generic_rdns=false
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, Code
from haraka_tw.config.formats import ini_number
from haraka_tw.dns import DNSError, NoAnswer, NXDomain
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import IDataPostHook, ILookupRdnsHook, IPluginContext, IRegistration
from haraka_tw.message.header import auth_results_value
from haraka_tw.plugins.helo.checks import (
    has_top_level_domain,
    is_dynamic,
    organizational_domain,
)
from haraka_tw.smtp.connection import Connection, canonical_address
from haraka_tw.smtp.replies import Reply

__all__ = ["MAX_NAMES", "Plugin", "is_generic_rdns"]

MAX_NAMES = 10
BOOLEANS = [
    "-reject.no_rdns",
    "-reject.no_fcrdns",
    "-reject.invalid_tld",
    "-reject.generic_rdns",
]
_STATIC = ("static", "business")
_HEADERS = ("X-Haraka-FCrDNS", "X-Haraka-rDNS-OtherIPs")


def is_generic_rdns(name: str, ip: str) -> bool:
    """Whether C{name} looks like an ISP's name for a dynamic address: its host part holds
    the IPv4 address (two adjacent octets, or its hex form), and neither "static" nor
    "business" is in it."""
    if not is_dynamic(name, ip):
        return False
    domain = organizational_domain(name) or ""
    host_part = name.lower()[: -len(domain) - 1] if domain else name.lower()
    return not any(word in host_part for word in _STATIC)


@implementer(IRegistration, ILookupRdnsHook, IDataPostHook)
class Plugin:
    name = "fcrdns"

    def __init__(self) -> None:
        self.timeout = 29.0
        self.reject: dict[str, bool] = {}

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.load()
        context.config.on_change("fcrdns.ini", self.load)

    def load(self) -> None:
        """(Re)read fcrdns.ini; a bad value raises, naming it, and changes nothing."""
        ini = self.config.get_ini("fcrdns.ini", booleans=BOOLEANS)
        timeout = ini_number(ini["main"], "timeout", 29, zero_ok=False, where="fcrdns.ini")
        self.timeout = float(timeout)
        self.reject = {key: bool(value) for key, value in ini["reject"].items()}

    # -- before the banner --------------------------------------------------------------

    def hook_lookup_rdns(self, connection: Connection) -> Any:
        """Look the client up both ways; refuse it only as [reject] says."""
        results = connection.results
        # (after XCLIENT this runs again, for another client: nothing of the one before)
        results.reset(self.name)
        entries = connection.auth_results_list
        entries[:] = [entry for entry in entries if not entry.startswith("iprev=")]
        for key, empty in (
            ("fcrdns", []), ("invalid_tlds", []), ("other_ips", []), ("ptr_names", []),
            ("ptr_name_to_ip", {}), ("has_rdns", False), ("ptr_name_has_ips", False),
            ("ptr_multidomain", False), ("generic_rdns", False),
        ):  # fmt: skip
            results.add(self.name, **{key: empty})
        client = canonical_address(connection.remote.ip)
        if client is None or connection.remote.is_private:
            results.add(self.name, skip="private_ip")
            return CONT
        check = Deferred.fromCoroutine(self._check(connection, client))
        policy = f"policy.iprev={auth_results_value(str(client))}"

        def timed_out(_: object, timeout: float) -> Any:
            results.add(self.name, err="timeout")
            connection.auth_results(f"iprev=temperror {policy} (timeout)")
            if self._rejects(connection, "no_rdns"):
                return DENYSOFT, Reply(421, "4.7.0", (f"client [{client}] rDNS lookup timeout",))
            return CONT

        timeout = under_hook_limit(self.config, self.name, self.timeout)
        return check.addTimeout(timeout, self.clock, onTimeoutCancel=timed_out)

    def _rejects(self, connection: Connection, check: str) -> bool:
        whitelisted = connection.notes.get("rdns_access") == "white"
        return self.reject.get(check, False) and (check == "no_fcrdns" or not whitelisted)

    async def _check(self, connection: Connection, client: Any) -> Any:
        results, ip = connection.results, str(client)
        policy = f"policy.iprev={auth_results_value(ip)}"
        try:
            names = await self.resolver.lookup_ptr(ip)
        except (NXDomain, NoAnswer):
            names = []
        except DNSError as e:
            results.add(self.name, err=f"PTR: {e}")
            connection.auth_results(f"iprev=temperror {policy}")
            if self._rejects(connection, "no_rdns"):
                text = f"client [{ip}] rDNS lookup error"
                return DENYSOFT, Reply(421, "4.7.0", (text,))
            return CONT
        if not names:
            results.add(self.name, fail="has_rdns")
            connection.auth_results(f"iprev=permerror {policy}")
            if self._rejects(connection, "no_rdns"):
                return DENY, Reply(554, "5.7.1", (f"client [{ip}] rejected; no rDNS",))
            return CONT
        results.add(self.name, ptr_names=names, has_rdns=True)
        checked = [n for n in names[:MAX_NAMES] if has_top_level_domain(n)]
        for name in names[:MAX_NAMES]:
            if name in checked:
                continue
            results.add(self.name, fail=f"valid_tld({name})")
            results.push(self.name, invalid_tlds=name)
            if self._rejects(connection, "invalid_tld"):
                text = f"client [{ip}] rejected; invalid TLD in rDNS ({name})"
                return DENY, Reply(554, "5.7.1", (text,))
        lookups = [self._addresses(name, client.version) for name in checked]
        answers = await DeferredList(lookups, consumeErrors=True)
        if any(isinstance(found, Failure) and found.check(CancelledError) for _, found in answers):
            raise CancelledError()  # (timed out: the timeout has answered)
        return self._judge(connection, client, checked, answers)

    def _addresses(self, name: str, version: int) -> Deferred[list[str]]:
        lookup = self.resolver.lookup_a if version == 4 else self.resolver.lookup_aaaa

        def none(failure: Any) -> list[str]:
            failure.trap(NXDomain, NoAnswer)
            return []

        found: Deferred[list[str]] = lookup(name)
        return found.addErrback(none)

    def _judge(
        self, connection: Connection, client: Any, names: list[str], answers: list[Any]
    ) -> Any:
        results, ip = connection.results, str(client)
        to_ip: dict[str, list[str]] = {}
        confirmed: list[str] = []
        exact, failed = False, False
        first_domain = organizational_domain(names[0]) if names else None
        for name, (ok, found) in zip(names, answers, strict=True):
            if not ok:
                failed = True
                results.add(self.name, err=f"{name}: {found.getErrorMessage()}")
                continue
            addresses = list(dict.fromkeys(found))
            to_ip[name.lower()] = addresses
            if organizational_domain(name) != first_domain:
                results.add(self.name, ptr_multidomain=True)
            if not addresses:
                results.add(self.name, fail=f"ptr_valid({name})")
                continue
            results.add(self.name, ptr_name_has_ips=True)
            forward = [canonical_address(a) for a in addresses]
            if client in forward:
                confirmed.append(name)
                exact = True
                results.add(self.name, **{"pass": "fcrdns"})
            elif client.version == 4 and any(
                a is not None and a.version == 4 and a.packed[:3] == client.packed[:3]
                for a in forward
            ):
                confirmed.append(name)
                results.add(self.name, **{"pass": "fcrdns(net)"})
            else:
                for address in addresses:
                    results.push(self.name, other_ips=address)
            if client.version == 4 and is_generic_rdns(name, ip):
                results.add(self.name, generic_rdns=True)
                if self._rejects(connection, "generic_rdns"):
                    text = f"client {name} [{ip}] rejected; generic rDNS, use your ISP's relay"
                    return DENY, Reply(554, "5.7.1", (text,))
        results.add(self.name, ptr_name_to_ip=to_ip, fcrdns=confirmed)
        verdict = "pass" if exact else "temperror" if failed else "fail"
        name = f" ({confirmed[0]})" if exact else ""
        connection.auth_results(f"iprev={verdict} policy.iprev={auth_results_value(ip)}{name}")
        if not confirmed:
            results.add(self.name, fail="fcrdns")
            if self._rejects(connection, "no_fcrdns"):
                if failed:  # (a lookup failed: it may match later)
                    return DENYSOFT, Reply(421, "4.7.0", ("no FCrDNS match found (DNS error)",))
                return DENY, Reply(554, "5.7.1", ("Sorry, no FCrDNS match found",))
        return CONT

    # -- the message --------------------------------------------------------------------

    def hook_data_post(self, connection: Connection) -> Code:
        """Note the confirming names and the other addresses in the header."""
        txn = connection.transaction
        if txn is None:
            return CONT
        for header in _HEADERS:
            txn.remove_header(header)
        found = connection.results.get(self.name) or {}
        if found.get("fcrdns"):
            txn.add_header(_HEADERS[0], " ".join(found["fcrdns"]))
        if found.get("other_ips"):
            txn.add_header(_HEADERS[1], " ".join(found["other_ips"]))
        return CONT
