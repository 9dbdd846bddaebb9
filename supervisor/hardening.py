"""The supervisor's side of issue 5: turn a Config's ``seccomp``,
``allow_nested`` and limit fields into the spec pid 1 applies
(``corral.spawn.harden``), parse sizes, and detect cgroup v2 delegation.
"""

import json
import os
import re

from .errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SYSCALL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# corral's own processes inside the sandbox's user namespace that RLIMIT_NPROC
# counts: stage-1 (C), pid 1 (D) and the undertaker (U, spawn/stage1.py).
HELPER_PROCESSES = 3


def parse_size(value, option="--memory"):
    """``512M``, ``2G``, ``1048576`` -> bytes (powers of 1024)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError("%s %r: expected a size such as 512M, 2G or a number of bytes"
                              % (option, value))
        number = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if number <= 0:
        raise ConfigError("%s %r: expected a positive size" % (option, value))
    return number


def parse_count(value, option):
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError("%s %r: expected a positive whole number" % (option, value)) from None
    if number <= 0 or isinstance(value, bool):
        raise ConfigError("%s %r: expected a positive whole number" % (option, value))
    return number


def check_seccomp(value):
    if value not in ("off", "default") and not isinstance(value, (str, os.PathLike)):
        raise ConfigError("--seccomp %r: expected off, default or a JSON file" % (value,))


def read_deny_file(path):
    """A ``--seccomp FILE``: a JSON list of system call names to deny (EPERM)
    on top of the default filter."""
    try:
        with open(path) as f:
            names = json.load(f)
    except OSError as exc:
        raise ConfigError("--seccomp %s: cannot read it (%s). Fix: name a JSON file, or use "
                          "--seccomp default|off" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise ConfigError("--seccomp %s: not JSON (%s). Fix: write a list of system call "
                          'names, e.g. ["ptrace", "personality"]' % (path, exc)) from None
    if not isinstance(names, list) or not all(isinstance(n, str) and _SYSCALL_NAME.match(n)
                                              for n in names):
        raise ConfigError('--seccomp %s: expected a JSON list of system call names, e.g. '
                          '["ptrace", "personality"]' % path)
    return names


def spec(config):
    """The ``harden`` part of the stage-1 spec."""
    seccomp = config.seccomp
    deny = []
    if seccomp not in ("off", "default"):
        deny = read_deny_file(seccomp)
        seccomp = "default"
    rlimits = {}
    for name, value in (("AS", config.memory), ("CPU", config.cpu_time),
                        ("NOFILE", config.nofile), ("FSIZE", config.fsize)):
        if value is not None:
            rlimits[name] = int(value)
    if config.pids is not None:
        rlimits["NPROC"] = config.pids + HELPER_PROCESSES
    return {"seccomp": seccomp, "deny": deny, "allow_nested": config.allow_nested,
            "rlimits": rlimits}


def cgroup_delegation(root="/sys/fs/cgroup", self_cgroup="/proc/self/cgroup"):
    """Is a cgroup v2 subtree delegated to us?  Return (available, detail).

    Available means: the unified hierarchy is mounted at ``root`` (not a v1
    hybrid), our cgroup there is writable by us, and it offers the memory and
    pids controllers."""
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return False, "cannot read %s (%s)" % (self_cgroup, exc.strerror)
    unified = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    if not unified:
        return False, "no cgroup v2 hierarchy for this process"
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        hybrid = os.path.exists(os.path.join(root, "unified", "cgroup.controllers"))
        return False, ("cgroup v1 at %s%s: limits use rlimits only" % (
            root, " (v2 only at %s/unified, without controllers)" % root if hybrid else ""))
    here = os.path.join(root, unified[0].lstrip("/"))
    try:
        with open(os.path.join(here, "cgroup.controllers")) as f:
            controllers = set(f.read().split())
    except OSError as exc:
        return False, "cannot read %s/cgroup.controllers (%s)" % (here, exc.strerror)
    missing = {"memory", "pids"} - controllers
    if missing:
        return False, "%s lacks the %s controller(s)" % (here, ", ".join(sorted(missing)))
    if not os.access(here, os.W_OK) or not os.access(os.path.join(here, "cgroup.procs"), os.W_OK):
        return False, "%s is not delegated to uid %d (not writable)" % (here, os.getuid())
    return True, "%s is delegated (memory, pids)" % here
