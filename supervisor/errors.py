"""Every exception corral raises, in one public module.

Two families, so callers can tell "you asked for something wrong" from "the
sandbox could not do what you asked":

- :class:`ConfigError` (also a :class:`ValueError`): misuse — a bad rule, a
  missing path, an unknown option.  Fix the input.
- :class:`SandboxError` (also an :class:`OSError`): a step failed at run time —
  a namespace, a mount, a uid map.  The message names the step, the errno and
  the fix.  corral never runs the command with less isolation than asked.

Messages are one line, start with what went wrong and end with ``Fix: ...``
when there is one.
"""

import errno as _errno
import os as _os


class CorralError(Exception):
    """Base class of every corral exception."""


class ConfigError(CorralError, ValueError):
    """The configuration, a rule, a path or an option is wrong."""


class CallbackTypeError(ConfigError, TypeError):
    """A policy callback has the wrong type: not callable, or ``on_connect``/``on_dns``
    not async, or ``on_packet`` async.  Raised before anything starts."""


class SandboxError(CorralError, OSError):
    """A sandbox set-up step failed; nothing was run with weaker isolation.

    ``step`` names the step (``"unshare"``, ``"uid_map"``, ``"mount /usr"``…),
    ``errno`` is the errno when there is one, ``fix`` a hint for the user,
    ``exit_code`` what ``corral run`` exits with (125; 127/126 when the command
    cannot be found/executed, like a shell).
    """

    def __init__(self, step, errno=None, fix=None, detail=None, exit_code=125, message=None):
        self.step = step
        self.exit_code = exit_code
        self.fix = fix
        self.detail = detail
        if message is None:
            parts = ["cannot set up the sandbox: %s failed" % step]
            if errno:
                parts[0] += " (%s: %s)" % (_errno.errorcode.get(errno, errno), _os.strerror(errno))
            if detail:
                parts.append(detail)
            if fix:
                parts.append("Fix: " + fix)
            message = ". ".join(parts)
        super().__init__(errno, message)

    def __str__(self):
        return self.strerror


class NetstackError(CorralError, OSError):
    """The userspace network stack reported a failure."""


class PolicyError(CorralError):
    """A policy callback raised or timed out (the flow was denied)."""
