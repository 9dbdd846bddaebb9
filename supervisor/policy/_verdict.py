"""Verdicts and decisions: the values the policy hands back."""

from __future__ import annotations

import inspect

import attrs

from corral.errors import CallbackTypeError

__all__ = ["ALLOW", "Decision", "Verdict", "check_callbacks", "deny"]


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise TypeError(f"corral.Verdict(allowed=...) must be True or False, not {value!r} "
                        f"({type(value).__name__}). Fix: return corral.ALLOW or corral.deny('why')")


def _reason(instance, attribute, value):
    if value is not None and not isinstance(value, str):
        raise TypeError(f"corral.Verdict(reason=...) must be a str or None, not {type(value).__name__}")


@attrs.frozen(kw_only=True)
class Verdict:
    """What a rule or a callback says about one flow or query.

    Callbacks return ``corral.ALLOW`` or ``corral.deny("why")``. ``allowed`` must be a
    ``bool`` and ``reason`` a ``str`` or ``None`` (anything else is a ``TypeError``:
    ``Verdict(allowed="no")`` must not read as an allow).
    """

    allowed: bool = attrs.field(validator=_bool)
    reason: str | None = attrs.field(default=None, validator=_reason)

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


def _is_async(func) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(type(func), "__call__", None)  # an object with an async __call__
    return not inspect.isroutine(func) and not inspect.isclass(func) and inspect.iscoroutinefunction(call)


def check_callbacks(*, on_connect=None, on_dns=None, on_packet=None, on_claim=None,
                    where: str = "") -> None:
    """Reject callbacks of the wrong kind before anything starts.

    ``on_connect`` / ``on_claim`` / ``on_dns`` are awaited: they must be ``async def`` functions (or
    objects with an ``async def __call__``). ``on_packet`` runs for every frame without
    awaiting: it must be a plain callable. ``None`` means "no callback". Raises
    :class:`corral.errors.CallbackTypeError` (a ``ConfigError`` and a ``TypeError``).
    """
    at = f"{where}: " if where else ""
    for name, func in (("on_connect", on_connect), ("on_claim", on_claim), ("on_dns", on_dns)):
        if func is None:
            continue
        arg = "query" if name == "on_dns" else "req"
        if not callable(func):
            raise CallbackTypeError(f"{at}{name} must be an async function, got {type(func).__name__} {func!r:.60}. "
                                    f"Fix: async def {name}({arg}) -> corral.Verdict")
        if not _is_async(func):
            raise CallbackTypeError(f"{at}{name} must be an async function (its result is awaited), got the "
                                    f"plain callable {func!r:.60}. Fix: define it with async def {name}({arg})")
    if on_packet is not None:
        if not callable(on_packet):
            raise CallbackTypeError(f"{at}on_packet must be a function, got {type(on_packet).__name__}. "
                                    "Fix: def on_packet(pkt) -> bool")
        if _is_async(on_packet):
            raise CallbackTypeError(f"{at}on_packet is called for every frame without awaiting: it must be a "
                                    "plain function. Fix: def on_packet(pkt) -> bool, not async def")


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
