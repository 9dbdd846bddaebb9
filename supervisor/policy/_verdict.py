"""Verdicts and decisions: the values the policy hands back."""

from __future__ import annotations

import attrs

__all__ = ["ALLOW", "Decision", "Verdict", "deny"]


@attrs.frozen(kw_only=True)
class Verdict:
    """What a rule or a callback says about one flow or query.

    Callbacks return ``corral.ALLOW`` or ``corral.deny("why")``.
    """

    allowed: bool
    reason: str | None = None

    def __repr__(self) -> str:
        if self.allowed:
            return "<Verdict allow>"
        return f"<Verdict deny {self.reason!r}>" if self.reason else "<Verdict deny>"


ALLOW = Verdict(allowed=True)


def deny(reason: str | None = None) -> Verdict:
    """A deny verdict; *reason* ends up in the event and the audit report."""
    return Verdict(allowed=False, reason=reason)


# Labels used as Decision.rule when no user rule decided.
DEFAULT_DENY = "default-deny"
AUDIT_ALLOW = "audit-allow"
CALLBACK = "callback"
CALLBACK_ERROR = "callback-error"
ALWAYS_DENIED_PREFIX = "always-denied:"
HOST_PORT_PREFIX = "allow-host-port:"


@attrs.frozen(kw_only=True)
class Decision:
    """A verdict plus what decided it.

    ``rule`` is the source text of the deciding rule (``"*.example.com"``), or one of
    ``default-deny``, ``audit-allow``, ``always-denied:<category>``,
    ``allow-host-port:<port>``, ``callback``, ``callback-error``.
    ``dial`` is set when the real destination differs from the one the sandbox asked
    for: ``--allow-host-port 8080`` turns 10.0.2.2:8080 into ``("127.0.0.1", 8080)``.
    """

    verdict: Verdict
    rule: str
    dial: tuple[str, int] | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict.allowed

    @property
    def by_default(self) -> bool:
        """True when no rule matched: the mode's default decided.

        Only such decisions are handed to a user callback (``on_connect``/``on_dns``);
        explicit rules, the always-denied set and ``--allow-host-port`` are final.
        """
        return self.rule in (DEFAULT_DENY, AUDIT_ALLOW)

    def __repr__(self) -> str:
        word = "allow" if self.allowed else "deny"
        dial = f" dial={self.dial[0]}:{self.dial[1]}" if self.dial else ""
        return f"<Decision {word} by {self.rule!r}{dial}>"


def from_callback(verdict: Verdict) -> Decision:
    """The decision for a callback's verdict."""
    if not isinstance(verdict, Verdict):
        return Decision(
            verdict=deny(f"callback returned {type(verdict).__name__}, not a corral.Verdict"),
            rule=CALLBACK_ERROR,
        )
    return Decision(verdict=verdict, rule=CALLBACK)


def from_callback_error(what: str) -> Decision:
    """The decision when a callback raised or timed out: deny."""
    return Decision(verdict=deny(what), rule=CALLBACK_ERROR)
