"""Denial hints: a blocked request should not look like a network failure.

``corral run -- curl http://example.com`` shows curl's "could not resolve host"; this sink
adds one line per denied destination, live the first time it is denied, e.g.::

    corral: denied DNS example.com (no rule allows it) — allow with --allow example.com

and a summary when the sandbox ends.  Past :data:`LIVE_LIMIT` destinations the live lines
stop (a scanner inside must not flood the user's terminal) and the summary says how many
were not shown.  Sandbox-chosen names are escaped before they reach the terminal.  Lines go
to ``warn`` (the CLI's stderr, or the API's ``on_warning``); ``--quiet`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable

from ._types import ConnectEvent, DnsEvent, Event

__all__ = ["DenialHints", "LIVE_LIMIT"]

LIVE_LIMIT = 5  # distinct denied destinations shown live; the rest only counted

_DEFAULT_DENY = "default-deny"
_ALWAYS_DENIED = "always-denied:"


def _clean(text: str, limit: int = 80) -> str:
    """A sandbox-chosen name, safe for a terminal: no control characters, bounded."""
    text = "".join(c if c.isprintable() else "\\x%02x" % (ord(c) & 0xFF) for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _host(ip: str) -> str:
    return "[%s]" % ip if ":" in ip else ip


class DenialHints:
    """An event sink that turns deny verdicts into one-line hints."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._warn = warn
        self._seen: dict[str, int] = {}  # destination key -> times denied
        self._shown = 0

    def write(self, event: Event) -> None:
        if getattr(event, "verdict", None) != "deny":
            return
        if isinstance(event, DnsEvent):
            name = event.qname.rstrip(".").lower()
            key, what, rule_hint = "dns " + name, "DNS %s" % _clean(name), name
        elif isinstance(event, ConnectEvent):
            name = event.name or event.sni or event.http_host
            dest = "%s:%d" % (_host(event.dst_ip), event.dst_port)
            key = "%s %s" % (event.proto, dest)
            what = "%s %s%s" % (event.proto, dest, " (%s)" % _clean(name) if name else "")
            if event.proto == "udp":
                dest += "/udp"
            rule_hint = "%s:%d" % (name, event.dst_port) if name else dest
        else:
            return
        count = self._seen.get(key, 0)
        self._seen[key] = count + 1
        if count or self._shown >= LIVE_LIMIT:
            return
        self._shown += 1
        self._warn(self._line(what, event.rule, rule_hint))

    def _line(self, what: str, rule: str, rule_hint: str) -> str:
        if rule.startswith(_ALWAYS_DENIED):
            return "denied %s (always denied: %s) — see docs/security.md" % (
                what, rule[len(_ALWAYS_DENIED):])
        why = "no rule allows it" if rule == _DEFAULT_DENY else "rule %s" % _clean(rule)
        line = "denied %s (%s)" % (what, why)
        if rule == _DEFAULT_DENY:
            line += " — allow with --allow %s" % _clean(rule_hint)
        return line

    def close(self) -> None:
        """The sandbox ended: one summary line when destinations were denied."""
        hidden = len(self._seen) - self._shown
        if hidden > 0:
            self._warn("%d destination(s) denied in all, %d not shown above; see them all "
                       "with --events FILE or `corral audit`" % (len(self._seen), hidden))
