"""Policy, flow descriptions, and the two decision functions.

Order of evaluation for a connection (first match decides):

1. deny rules (on the address, its embedded IPv4 form, or any name of the flow): deny wins;
2. ``--allow-host-port PORT``: 10.0.2.2:PORT / [fd00::2]:PORT → allow, dial the host's
   127.0.0.1:PORT / [::1]:PORT;
3. the always-denied set (see ``_always``): deny unless an allow rule names the address
   explicitly (one exact address, given directly, not read from a file);
4. allow rules: an address/network rule covering the destination, or a domain rule
   covering one of the names the sandbox resolved for it through corral's DNS;
5. the mode's default: ``run`` denies, ``audit`` allows.

Names claimed by the client (TLS SNI, HTTP Host) are not trusted to *allow*: anyone can
write any SNI. They are matched by deny rules, and when a flow is allowed by a domain
rule every claimed name must be covered by an allow domain rule as well (no domain
fronting past the allowlist). A flow allowed by an address rule is not narrowed by
claimed names except through deny rules.

DNS: a query is allowed when some allow rule's domain covers the name (whatever port or
transport the rule carries: ``example.com:443`` still lets the sandbox resolve
example.com) and no deny rule without a port/transport covers it. A deny rule with a
port or transport restricts connections only. Address rules play no part in DNS.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

import attrs

from ._always import GATEWAY_V4, GATEWAY_V6, always_denied, embedded_ipv4
from corral.errors import ConfigError

from ._process import Process
from ._rules import IPAddress, Rule, normalize_ip, normalize_name
from ._verdict import (
    ALLOW,
    ALWAYS_DENIED_PREFIX,
    AUDIT_ALLOW,
    DEFAULT_DENY,
    HOST_PORT_PREFIX,
    Decision,
    deny,
)

__all__ = [
    "ConnectRequest", "DnsQuery", "Policy", "claims_can_deny", "decide_connect", "decide_dns", "parse_host_port",
]

CLAIMED_NAME_NOT_ALLOWED = "claimed-name-not-allowed"


def _rules_converter(action: str):
    def convert(items: Iterable[Rule | str]) -> tuple[Rule, ...]:
        if isinstance(items, (str, Rule)):
            items = [items]
        out = []
        for item in items:
            rule = item if isinstance(item, Rule) else Rule.parse(item, action, origin=f"--{action}")
            if rule.action != action:
                raise ConfigError(f"rule {rule.label!r} is a {rule.action} rule, given as a {action} rule")
            out.append(rule)
        return tuple(out)

    return convert


def parse_host_port(text: str | int) -> int:
    """``--allow-host-port PORT`` → PORT, or ConfigError."""
    try:
        port = int(text)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535 or (isinstance(text, str) and not text.strip().isdigit()):
        raise ConfigError(
            f"invalid --allow-host-port {text!r}: expected a port number 1-65535 on the host's "
            "loopback, e.g. --allow-host-port 8080 (the sandbox then reaches it at 10.0.2.2:8080)"
        )
    return port


def _host_ports(items: Iterable[int | str]) -> frozenset[int]:
    return frozenset(parse_host_port(p) for p in items)


def _ip(value: str | IPAddress) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    return ipaddress.ip_address(value)


@attrs.frozen(kw_only=True)
class Policy:
    """Static rules plus the mode. Immutable: build a new one to change the rules.

    ``allow``/``deny`` take :class:`Rule` objects or rule texts.
    """

    mode: str = attrs.field(default="run", validator=attrs.validators.in_(("run", "audit")))
    allow: tuple[Rule, ...] = attrs.field(default=(), converter=_rules_converter("allow"))
    deny: tuple[Rule, ...] = attrs.field(default=(), converter=_rules_converter("deny"))
    host_ports: frozenset[int] = attrs.field(default=frozenset(), converter=_host_ports)

    def __repr__(self) -> str:
        return (
            f"<Policy {self.mode} allow={[r.label for r in self.allow]} "
            f"deny={[r.label for r in self.deny]} host_ports={sorted(self.host_ports)}>"
        )


@attrs.frozen(kw_only=True)
class ConnectRequest:
    """A new flow from the sandbox, as the policy and ``on_connect`` see it.

    ``names`` are the names the sandbox resolved to ``dst_ip`` through corral's DNS
    (most recent first); ``sni``/``http_host`` are what the client claimed in its
    first bytes, when known.  ``process``: the process inside holding the flow's
    socket (:class:`Process`), or None with the reason in ``process_unknown``.
    """

    id: int
    proto: str = attrs.field(validator=attrs.validators.in_(("tcp", "udp", "icmp")))
    src_ip: IPAddress = attrs.field(converter=_ip)
    src_port: int
    dst_ip: IPAddress = attrs.field(converter=_ip)
    dst_port: int
    names: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    sni: str | None = None
    http_host: str | None = None
    process: Process | None = None
    process_unknown: str | None = None

    @property
    def name(self) -> str | None:
        """The best single name for the destination: DNS first, then SNI, then Host."""
        if self.names:
            return self.names[0]
        return self.sni or self.http_host

    def __repr__(self) -> str:
        dst = f"[{self.dst_ip}]" if self.dst_ip.version == 6 else str(self.dst_ip)
        name = f" ({self.name})" if self.name else ""
        return f"<ConnectRequest #{self.id} {self.proto} {dst}:{self.dst_port}{name}>"


@attrs.frozen(kw_only=True)
class DnsQuery:
    """A DNS query from the sandbox, as the policy and ``on_dns`` see it.

    ``id`` is the DNS message id; ``qtype`` the type's name ('A', 'AAAA', 'TXT', 'TYPE65534').
    """

    id: int
    qname: str
    qtype: str
    transport: str = attrs.field(default="udp", validator=attrs.validators.in_(("udp", "tcp")))
    src_ip: IPAddress | None = attrs.field(default=None, converter=attrs.converters.optional(_ip))
    src_port: int | None = None
    process: Process | None = None
    process_unknown: str | None = None

    def __repr__(self) -> str:
        return f"<DnsQuery #{self.id} {self.qname} {self.qtype}/{self.transport}>"


def claimed_name(name: str | None) -> str | None:
    """A Host header or SNI value as a bare normalized name ('Example.com:8080' → 'example.com')."""
    if not name:
        return None
    name = name.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":")[0]
    return normalize_name(name) or None


def _addr(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def claims_can_deny(policy: Policy, req: ConnectRequest) -> bool:
    """Whether some TLS SNI / HTTP Host the client may claim could make
    :func:`decide_connect` deny ``req`` (whose ``sni``/``http_host`` are not set yet).

    Claimed names enter the decision in two places only: deny rules on names, and
    the check that a flow allowed by a domain rule claims only allowed names.  When
    neither can apply, the claims change at most the rule that gets the credit (an
    allow rule on the claimed name in audit mode), never the verdict, so the flow
    need not wait for its first bytes.  Conservative: True whenever a name rule
    could be involved.
    """
    port = req.dst_port
    if any(r.domain is not None and r.matches_endpoint(req.proto, port) for r in policy.deny):
        return True
    if policy.mode == "audit" or not req.names:
        return False
    dns_names = [normalize_name(n) for n in req.names]
    return any(
        r.domain is not None and r.matches_endpoint(req.proto, port) and any(r.matches_name(n) for n in dns_names)
        for r in policy.allow
    )


def decide_connect(policy: Policy, req: ConnectRequest) -> Decision:
    """The static decision for a new flow. Pure; see the module docstring for the order."""
    dst = normalize_ip(req.dst_ip)
    v4 = embedded_ipv4(dst)
    port = req.dst_port
    dns_names = [normalize_name(n) for n in req.names]
    claimed = [n for n in (claimed_name(req.sni), claimed_name(req.http_host)) if n]
    all_names = dns_names + claimed
    what = _addr(dst, port) + (f" ({all_names[0]})" if all_names else "")

    proc = req.process
    for rule in policy.deny:
        if not rule.matches_endpoint(req.proto, port) or not rule.applies_to(proc):
            continue
        if rule.covers_ip(dst) or (v4 is not None and rule.covers_ip(v4)) or any(
            rule.matches_name(n) for n in all_names
        ):
            return Decision(verdict=deny(f"{what} matches deny rule {rule.label}"), rule=rule.label)

    if port in policy.host_ports and req.proto in ("tcp", "udp") and dst in (GATEWAY_V4, GATEWAY_V6):
        loop = "127.0.0.1" if dst.version == 4 else "::1"
        return Decision(verdict=ALLOW, rule=f"{HOST_PORT_PREFIX}{port}", dial=(loop, port))

    hit = always_denied(dst)
    if hit is not None:
        category, rng = hit
        for rule in policy.allow:
            net = rule.network
            if (
                net is not None
                and net.prefixlen == net.max_prefixlen  # one address, never a network
                and not rule.from_file  # typed by the user, not read from a (suggested) file
                and net.version == rng.version
                and net.subnet_of(rng)
                and rule.covers_ip(dst)
                and rule.matches_endpoint(req.proto, port)
                and rule.applies_to(proc)
            ):
                return Decision(verdict=ALLOW, rule=rule.label)
        hint = (
            f"; to reach the host's loopback use --allow-host-port {port}"
            if category in ("loopback", "gateway")
            else f"; name it explicitly (--allow {dst}) to open it"
        )
        return Decision(
            verdict=deny(f"{_addr(dst, port)} is {category}, always denied{hint}"),
            rule=ALWAYS_DENIED_PREFIX + category,
        )

    allowed_by = None
    for rule in policy.allow:
        if not rule.matches_endpoint(req.proto, port) or not rule.applies_to(proc):
            continue
        if rule.covers_ip(dst):
            return Decision(verdict=ALLOW, rule=rule.label)
        if allowed_by is None and any(rule.matches_name(n) for n in dns_names):
            allowed_by = rule
    if allowed_by is not None:
        for name in claimed:
            if not any(r.matches_name(name) and r.matches_endpoint(req.proto, port) and r.applies_to(proc)
                       for r in policy.allow):
                if policy.mode == "audit":
                    break
                return Decision(
                    verdict=deny(
                        f"{what}: the client names {name!r} in its first bytes, "
                        f"which no allow rule covers"
                    ),
                    rule=CLAIMED_NAME_NOT_ALLOWED,
                )
        else:
            return Decision(verdict=ALLOW, rule=allowed_by.label)

    if policy.mode == "audit":
        return Decision(verdict=ALLOW, rule=AUDIT_ALLOW)
    return Decision(verdict=deny(f"no rule allows {req.proto} to {what}"), rule=DEFAULT_DENY)


def decide_dns(policy: Policy, query: DnsQuery) -> Decision:
    """The static decision for a DNS query. Pure."""
    name = normalize_name(query.qname)
    for rule in policy.deny:
        if rule.port is None and rule.proto is None and rule.matches_name(name) and rule.applies_to(query.process):
            return Decision(verdict=deny(f"{name} matches deny rule {rule.label}"), rule=rule.label)
    for rule in policy.allow:
        if rule.matches_name(name) and rule.applies_to(query.process):
            return Decision(verdict=ALLOW, rule=rule.label)
    if policy.mode == "audit":
        return Decision(verdict=ALLOW, rule=AUDIT_ALLOW)
    return Decision(verdict=deny(f"no rule allows resolving {name}"), rule=DEFAULT_DENY)
