"""IP → names learned from the DNS answers the sandbox received through corral."""

from __future__ import annotations

import collections
from typing import Iterable

import attrs

from ._rules import IPAddress, normalize_ip, normalize_name

__all__ = ["Answer", "NameTable"]

_MAX_CHAIN = 16


@attrs.frozen(kw_only=True)
class Answer:
    """One resource record of a DNS answer section, as the name table needs it.

    ``rtype`` is the type's name ('A', 'AAAA', 'CNAME', ...); ``value`` its text
    (an address, or the CNAME target without the trailing dot).
    """

    name: str
    rtype: str
    value: str
    ttl: int

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.rtype, "value": self.value, "ttl": self.ttl}


@attrs.define
class NameTable:
    """Which names the sandbox resolved to which addresses.

    Names live for their TTL clamped to ``[min_ttl, max_ttl]``: programs cache answers
    longer than their TTL (a 5 s TTL is common, a JVM caches 30 s), and a name that
    expired from the table would turn an allowed connection into a default deny. The
    table is bounded: at most ``max_ips`` addresses (least recently learned evicted
    first) and ``max_names_per_ip`` names per address (oldest dropped).
    ``now`` is any monotonic clock in seconds; the caller supplies it (sans-io).
    """

    max_ips: int = 16384
    max_names_per_ip: int = 16
    min_ttl: float = 600.0
    max_ttl: float = 86400.0
    # ip -> {name: expiry}; dict order = learning order, the last is the newest
    _by_ip: collections.OrderedDict = attrs.field(factory=collections.OrderedDict, init=False)

    def __len__(self) -> int:
        return len(self._by_ip)

    def __repr__(self) -> str:
        return f"<NameTable {len(self._by_ip)} addresses>"

    def add(self, ip: str | IPAddress, name: str, ttl: float, now: float) -> None:
        """Attribute *ip* to *name* for *ttl* seconds (clamped) from *now*."""
        ip = normalize_ip(ip)
        name = normalize_name(name)
        if not name:
            return
        expiry = now + min(max(float(ttl), self.min_ttl), self.max_ttl)
        names = self._by_ip.pop(ip, None) or {}
        old = names.pop(name, None)
        names[name] = max(expiry, old or expiry)
        while len(names) > self.max_names_per_ip:
            del names[next(iter(names))]
        self._by_ip[ip] = names
        while len(self._by_ip) > self.max_ips:
            self._by_ip.popitem(last=False)

    def learn(self, qname: str, answers: Iterable[Answer], now: float) -> dict[IPAddress, tuple[str, ...]]:
        """Feed one response's answer section for a query of *qname*.

        Follows the CNAME chain from *qname*; every A/AAAA record on the chain is
        attributed to its owner and to every name before it on the chain (so to the
        queried name too). Records off the chain are ignored. Returns what was learned.
        """
        answers = list(answers)
        cname = {}
        for a in answers:
            if a.rtype == "CNAME":
                cname.setdefault(normalize_name(a.name), normalize_name(a.value))
        chain = [normalize_name(qname)]
        while chain[-1] in cname and len(chain) <= _MAX_CHAIN:
            nxt = cname[chain[-1]]
            if nxt in chain:
                break
            chain.append(nxt)
        learned: dict[IPAddress, tuple[str, ...]] = {}
        for a in answers:
            if a.rtype not in ("A", "AAAA"):
                continue
            owner = normalize_name(a.name)
            if owner not in chain:
                continue
            try:
                ip = normalize_ip(a.value)
            except ValueError:
                continue
            names = chain[: chain.index(owner) + 1]
            for name in reversed(names):  # queried name ends up newest: names_for lists it first
                self.add(ip, name, a.ttl, now)
            learned[ip] = tuple(names)
        return learned

    def names_for(self, ip: str | IPAddress, now: float) -> tuple[str, ...]:
        """Names *ip* currently carries, most recently learned first."""
        ip = normalize_ip(ip)
        names = self._by_ip.get(ip)
        if not names:
            return ()
        live = {n: e for n, e in names.items() if e > now}
        if len(live) != len(names):
            if live:
                self._by_ip[ip] = live
            else:
                del self._by_ip[ip]
        return tuple(reversed(live))

    def expire(self, now: float) -> int:
        """Drop every expired entry; returns how many addresses were removed."""
        dead = []
        for ip, names in self._by_ip.items():
            for n in [n for n, e in names.items() if e <= now]:
                del names[n]
            if not names:
                dead.append(ip)
        for ip in dead:
            del self._by_ip[ip]
        return len(dead)
