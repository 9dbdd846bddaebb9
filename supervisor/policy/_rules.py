"""Rule text → Rule, and the per-rule matching primitives.

Accepted forms (``--allow``, ``--deny``, one per line in ``--allow-file``)::

    example.com            exactly this name
    *.example.com          any name below example.com, at any depth; NOT example.com itself
    example.com:443        the name, on port 443
    203.0.113.7            one address            203.0.113.0/24     a network
    2001:db8::1            one IPv6 address       2001:db8::/32      an IPv6 network
    [2001:db8::1]:53       an IPv6 address with a port (brackets are required for a port)
    .../tcp  .../udp       optional suffix restricting the transport

Domain rules match the names a flow carries (the names the sandbox resolved through
corral's DNS and, later, TLS SNI / HTTP Host); IP rules match the destination address.
A rule without a port and without a transport also matches ICMP.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Iterable

import attrs

from corral.errors import ConfigError

__all__ = ["Rule", "load_allow_file", "normalize_name", "parse_rules"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

VALID_FORMS = (
    "example.com, *.example.com, example.com:443, 203.0.113.7, 203.0.113.0/24, "
    "2001:db8::/32, [2001:db8::1]:53, each optionally ending in /tcp or /udp"
)
_PROTOS = ("tcp", "udp")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
# --allow-file bounds: a rule file is a short list a person wrote (and /dev/zero is not one).
MAX_RULE_FILE = 1 << 20  # bytes
MAX_RULE_LINE = 1024  # characters


def normalize_name(name: str) -> str:
    """Lower-case, no trailing dot: the form names are compared in."""
    return name.rstrip(".").lower()


def normalize_ip(ip: str | IPAddress) -> IPAddress:
    """An address as flows are matched: IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes IPv4.

    The kernel dials ::ffff:a.b.c.d as a.b.c.d, so the two are the same destination.
    """
    if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = ipaddress.ip_address(ip)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Bad(Exception):
    """Internal: the reason a rule text is invalid."""


def _parse_port(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _Bad(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _Bad(f"port {port} is out of range 1-65535")
    return port


def _parse_network(host: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(host, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            fixed = ipaddress.ip_network(host, strict=False)
            raise _Bad(f"{host} has host bits set (the network is {fixed})") from None
        raise _Bad(f"{host!r} is not a valid IP network ({e})") from None
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        # ::ffff:203.0.113.0/120 is 203.0.113.0/24: match the way flows are normalized.
        net = ipaddress.ip_network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


def _ambiguous_ipv6(host: str) -> bool:
    """``2001:db8::1:53`` is an address, but reads as ``[2001:db8::1]:53`` too:
    true when the last group could be a port of a shorter valid address."""
    if "::" not in host or "/" in host:
        return False
    head, _, last = host.rpartition(":")
    if not (last.isascii() and last.isdigit() and 1 <= int(last) <= 65535):
        return False
    try:
        ipaddress.IPv6Address(head)
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _refuse_ambiguous_ipv6(host: str) -> None:
    if _ambiguous_ipv6(host):
        head, _, last = host.rpartition(":")
        raise _Bad(f"{host} is ambiguous: an IPv6 address, or {head} with port {last}? "
                   f"Fix: write [{head}]:{last} for the port, or [{host}] for the address")


def _parse_domain(host: str) -> tuple[str, bool]:
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise _Bad("'*' is only allowed as the whole first label, as in *.example.com")
    name = host.lower()
    if name.endswith("."):  # one trailing dot: the absolute form
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Bad(f"{host!r} is not a valid internationalized domain name") from None
    if not name:
        raise _Bad("empty host name")
    if len(name) > 253:
        raise _Bad("host name is longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise _Bad(f"{label!r} is not a valid DNS label (letters, digits, '-', '_', 1-63 long)")
    if labels[-1].isdigit():
        raise _Bad(f"{host!r} is neither a valid IP address nor a domain name")
    return name, wildcard


@attrs.frozen(kw_only=True)
class Rule:
    """One allow or deny rule. Build with :meth:`Rule.parse`.

    Exactly one of ``domain`` / ``network`` is set. ``text`` is the rule as the user
    wrote it and ``origin`` where (``"--allow"``, ``"allow.txt:3"``): both are for
    reporting and do not take part in equality. ``from_file`` marks a rule read by
    :func:`load_allow_file`: such a rule never opens the always-denied set.
    """

    action: str = attrs.field(validator=attrs.validators.in_(("allow", "deny")))
    domain: str | None = None
    wildcard: bool = False
    network: IPNetwork | None = None
    port: int | None = None
    proto: str | None = attrs.field(default=None, validator=attrs.validators.in_((None, *_PROTOS)))
    text: str = attrs.field(default="", eq=False)
    origin: str | None = attrs.field(default=None, eq=False)
    from_file: bool = attrs.field(default=False, eq=False)

    @classmethod
    def parse(cls, text: str, action: str = "allow", *, origin: str | None = None) -> Rule:
        """Parse one rule; raise ``ConfigError`` naming the bad text and the valid forms."""
        if action not in ("allow", "deny"):
            raise ValueError(f"action must be 'allow' or 'deny', not {action!r}")
        try:
            fields = cls._fields(text)
        except _Bad as e:
            where = f"{origin}: " if origin else ""
            raise ConfigError(
                f"{where}invalid {action} rule {text!r}: {e}. Valid forms: {VALID_FORMS}"
            ) from None
        return cls(action=action, text=text.strip(), origin=origin, **fields)

    @staticmethod
    def _fields(text: str) -> dict:
        if not isinstance(text, str):
            raise _Bad(f"expected a string, got {type(text).__name__}")
        s = text.strip()
        if not s:
            raise _Bad("the rule is empty")
        if any(c.isspace() for c in s):
            raise _Bad("a rule cannot contain spaces (one rule per --allow/--deny or per line)")
        proto = None
        head, slash, tail = s.rpartition("/")
        if slash and tail.lower() in _PROTOS:
            proto, s = tail.lower(), head
        elif slash and tail.isalpha():
            raise _Bad(f"unknown suffix '/{tail}' (use /tcp or /udp)")
        port = None
        if s.startswith("["):
            end = s.find("]")
            if end < 0:
                raise _Bad("missing ']' after an IPv6 address")
            host, rest = s[1:end], s[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise _Bad(f"unexpected {rest!r} after ']' (expected :PORT)")
                port = _parse_port(rest[1:])
            if ":" not in host:
                raise _Bad("brackets are for IPv6 addresses only: write 203.0.113.7:53, not [203.0.113.7]:53")
        elif s.count(":") == 1:
            host, port_text = s.split(":")
            port = _parse_port(port_text)
        else:
            host = s
            _refuse_ambiguous_ipv6(host)
        if not host:
            raise _Bad("no host before the port")
        if ":" in host or "/" in host or (host.replace(".", "").isdigit() and host.count(".") == 3):
            if "%" in host:
                raise _Bad("IPv6 scope ids (%iface) are not allowed in rules")
            return {"network": _parse_network(host), "port": port, "proto": proto}
        domain, wildcard = _parse_domain(host)
        return {"domain": domain, "wildcard": wildcard, "port": port, "proto": proto}

    # -- rendering -------------------------------------------------------------
    def __str__(self) -> str:
        if self.network is not None:
            net = self.network
            host = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            if net.version == 6 and (self.port is not None or _ambiguous_ipv6(host)):
                host = f"[{host}]"
        else:
            host = ("*." if self.wildcard else "") + str(self.domain)
        port = f":{self.port}" if self.port is not None else ""
        proto = f"/{self.proto}" if self.proto else ""
        return host + port + proto

    def __repr__(self) -> str:
        at = f" from {self.origin}" if self.origin else ""
        return f"<Rule {self.action} {self}{at}>"

    @property
    def label(self) -> str:
        """What events and reports show as the deciding rule."""
        return self.text or str(self)

    @property
    def kind(self) -> str:
        """'domain', 'wildcard', 'address' or 'network'."""
        if self.network is not None:
            return "address" if self.network.prefixlen == self.network.max_prefixlen else "network"
        return "wildcard" if self.wildcard else "domain"

    # -- matching --------------------------------------------------------------
    def matches_name(self, name: str) -> bool:
        """Does this domain rule cover *name* (already normalized)? IP rules never do."""
        if self.domain is None:
            return False
        if self.wildcard:
            return name.endswith("." + self.domain)
        return name == self.domain

    def matches_endpoint(self, proto: str, port: int | None) -> bool:
        """Transport and port restrictions only. ICMP has no port: port rules skip it."""
        if self.proto is not None and self.proto != proto:
            return False
        if self.port is not None and (proto == "icmp" or self.port != port):
            return False
        return True

    def covers_ip(self, ip: IPAddress) -> bool:
        net = self.network
        return net is not None and ip.version == net.version and ip in net


def parse_rules(texts: Iterable[str], action: str, *, origin: str | None = None) -> list[Rule]:
    """Parse several rules (``--allow a --allow b``)."""
    if isinstance(texts, str):
        texts = [texts]
    return [Rule.parse(t, action, origin=origin) for t in texts]


def load_allow_file(path: str | os.PathLike, action: str = "allow") -> list[Rule]:
    """Rules from a file: one per line, ``#`` starts a comment, blank lines ignored.

    Errors name ``file:line``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read(MAX_RULE_FILE + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read rule file {os.fspath(path)!r}: {e}") from None
    if len(content) > MAX_RULE_FILE:
        raise ConfigError(f"rule file {os.fspath(path)!r} is larger than {MAX_RULE_FILE >> 20} MiB. "
                          "Fix: name a text file with one rule per line")
    rules = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if len(line) > MAX_RULE_LINE:
            raise ConfigError(f"{os.fspath(path)}:{lineno}: line longer than {MAX_RULE_LINE} "
                              "characters. Fix: one rule per line")
        text = line.split("#", 1)[0].strip()
        if text:
            rule = Rule.parse(text, action, origin=f"{os.fspath(path)}:{lineno}")
            rules.append(attrs.evolve(rule, from_file=True))
    return rules
