"""The process behind a flow or a DNS query, and program scopes of rules (issue 13).

Sans-io: :class:`Process` is filled in by ``corral.net.owner`` from the kernel;
:class:`Scope` is the ``@PROGRAM`` part of a rule (docs/policy.md, "Program scopes").

What is trustworthy (docs/events.md): ``pid``, ``ppid`` and the ancestry's shape come
from the kernel (socket inode -> the processes holding it -> their parents) and cannot
be forged from inside; ``exe`` is the file the kernel executed, named by its path in the
sandbox (a program may be copied or renamed anywhere the sandbox can write); ``argv``
and ``cwd`` are what the process says about itself (a process can rewrite its own
argv), and so is the script name of an interpreter.
"""

from __future__ import annotations

import os

import attrs

from corral.errors import ConfigError

__all__ = ["Process", "Scope"]


@attrs.frozen(kw_only=True)
class Process:
    """A process inside the sandbox (pids as the sandbox sees them).

    ``ancestry`` names the programs from the sandbox's first command down to this one
    (``["npm", "sh", "node install.js", "curl"]``); ``ancestry_exe`` their executables,
    ``ancestry_pids`` their pids.
    ``others``: further processes holding the same socket (inherited or passed), each
    of which could have used it.
    """

    pid: int
    ppid: int
    exe: str
    argv: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    cwd: str | None = None
    ancestry: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    ancestry_exe: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    ancestry_pids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    others: tuple[Process, ...] = attrs.field(default=(), converter=tuple)

    def with_others(self, others: tuple[Process, ...]) -> Process:
        return attrs.evolve(self, others=others)

    def holders(self) -> tuple[Process, ...]:
        return (self, *self.others)

    def to_dict(self) -> dict:
        d = {
            "pid": self.pid, "ppid": self.ppid, "exe": self.exe, "argv": list(self.argv),
            "cwd": self.cwd, "ancestry": list(self.ancestry), "ancestry_exe": list(self.ancestry_exe),
            "ancestry_pids": list(self.ancestry_pids),
        }
        if self.others:
            d["others"] = [o.to_dict() for o in self.others]
        return d

    def __repr__(self) -> str:
        return f"<Process {self.pid} {' > '.join(self.ancestry) or self.exe}>"


INTERPRETERS = ("python", "node", "perl", "ruby", "sh", "bash", "dash", "zsh", "php", "lua")


def script_of(exe: str | None, argv: tuple[str, ...]) -> str | None:
    """The script an interpreter runs (its first non-option argument), or None."""
    base = os.path.basename(exe or "")
    if not base.startswith(INTERPRETERS) or len(argv) < 2:
        return None
    for arg in argv[1:]:
        if arg in ("-c", "-e", "-m", "--eval"):
            return None  # code on the command line, not a file
        if not arg.startswith("-"):
            return arg
    return None


def program_label(exe: str | None, argv: tuple[str, ...]) -> str:
    """'curl', or 'node install.js' for an interpreter running a script."""
    base = os.path.basename(exe or "") or (os.path.basename(argv[0]) if argv else "?")
    script = script_of(exe, argv)
    return f"{base} {os.path.basename(script)}" if script else base


WITHIN = "within:"


@attrs.frozen(kw_only=True)
class Scope:
    """``@PROGRAM`` (the process itself) or ``@within:PROGRAM`` (it or any ancestor).

    PROGRAM with a ``/`` is a full path, compared with the executable's path (or an
    interpreter's script path); without, a basename, compared with the executable's
    basename (or the script's).
    """

    program: str
    within: bool = False

    @classmethod
    def parse(cls, text: str) -> Scope:
        within = text.startswith(WITHIN)
        program = text[len(WITHIN):] if within else text
        if not program:
            raise ValueError("no program after '@' (write host@pip, host@/usr/bin/pip or host@within:pip)")
        if any(c in program for c in "@*?[]#") or not program.isprintable() or any(c.isspace() for c in program):
            raise ValueError(f"program {program!r} may not contain '@', '*', '?', '[', ']', '#', "
                             "spaces or control characters")
        if "/" in program and not program.startswith("/"):
            raise ValueError(f"program path {program!r} must be absolute (or a bare name like pip)")
        return cls(program=program, within=within)

    def __str__(self) -> str:
        return "@" + (WITHIN if self.within else "") + self.program

    def _names(self, exe: str, script: str | None) -> bool:
        want = self.program
        for path in (exe, script):
            if not path:
                continue
            if ("/" in want and path == want) or ("/" not in want and os.path.basename(path) == want):
                return True
        return False

    def covers(self, process: Process | None) -> bool:
        """Does the scope cover every process that holds the flow's socket?  An
        unknown process is never covered (a scoped rule never opens it)."""
        if process is None:
            return False
        return all(self._covers_one(p) for p in process.holders())

    def _covers_one(self, p: Process) -> bool:
        if self._names(p.exe, script_of(p.exe, p.argv)):
            return True
        if not self.within:
            return False
        # ancestors: executables, and the script an interpreter ancestor ran (by label)
        for exe, label in zip(p.ancestry_exe[:-1], p.ancestry[:-1]):
            script = label.split(" ", 1)[1] if " " in label else None
            if self._names(exe, script):
                return True
        return False


def split_scope(text: str) -> tuple[str, Scope | None]:
    """'pypi.org@pip' -> ('pypi.org', Scope('pip')); a rule without '@' -> (text, None)."""
    if "@" not in text:
        return text, None
    rule, _, scope = text.partition("@")
    try:
        return rule, Scope.parse(scope.strip())
    except ValueError as exc:
        raise ConfigError(f"invalid program scope in {text!r}: {exc}") from None
