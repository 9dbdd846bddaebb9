"""The sandbox's configuration: one attrs class, one field per CLI option.

``corral run --rw DIR --net none -- cmd`` and ``corral.Config(rw=[DIR],
net="none")`` are the same thing; :meth:`Config.from_cli` is the bridge.
Validation happens here (types, choices, ranges); checks that need the
filesystem (does a path exist?) happen when the mount plan is built, and both
raise :class:`corral.errors.ConfigError`.
"""

import fnmatch
import os
import re

import attrs

from . import hardening
from .errors import ConfigError

FS_MODES = ("default", "readonly", "hermetic")
NET_MODES = ("filtered", "none", "host")
DATA_PATHS = ("direct", "pump")
PATH_ACTIONS = ("rw", "ro", "overlay", "tmpfs", "hide")

# Environment variables that look like credentials are dropped unless kept with
# --env NAME.  Matched case-insensitively against the whole name.
SECRET_ENV_PATTERNS = (
    "*_TOKEN", "*_TOKENS", "*TOKEN_*", "TOKEN",
    "*SECRET*",
    "*_KEY", "*_KEYS", "*_KEY_*", "*APIKEY*", "*API_KEY*",
    "*PASSWORD*", "*PASSWD*", "*_PASS", "*_PWD",
    "*CREDENTIAL*", "*_AUTH", "*_AUTH_*",
    "AWS_*", "AZURE_*", "GOOGLE_APPLICATION_CREDENTIALS", "GCLOUD_*",
    "GITHUB_TOKEN", "GH_TOKEN", "GITLAB_*TOKEN*", "NPM_CONFIG__AUTH*",
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "DBUS_SESSION_BUS_ADDRESS",
    "GPG_AGENT_INFO", "KRB5CCNAME", "VAULT_*", "DOCKER_AUTH_CONFIG",
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_secret(name):
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, pattern) for pattern in SECRET_ENV_PATTERNS)


def _tuple_of_str(value):
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike)):
        value = [value]
    return tuple(os.fspath(v) for v in value)


def _choice(choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise ConfigError(
                "%s must be one of %s, not %r" % (attribute.name, ", ".join(choices), value)
            )

    return check


def _positive_or_none(instance, attribute, value):
    if value is not None and not value > 0:
        raise ConfigError("%s must be a positive number of seconds, not %r" % (attribute.name, value))


def _positive(what):
    def check(instance, attribute, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise ConfigError("--%s %r: expected a positive %s"
                              % (attribute.name.replace("_", "-"), value, what))

    return check


def _non_negative_seconds(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError("--%s %r: expected 0 or more seconds"
                          % (attribute.name.replace("_", "-"), value))


# Below this address-space limit even the dynamic loader cannot map libc and
# the command dies with SIGSEGV before its first instruction (python3 needs ~16M).
MIN_MEMORY = 16 << 20


def _memory(value):
    size = hardening.parse_size(value, "--memory")
    if size is not None and size < MIN_MEMORY:
        raise ConfigError("--memory %r: too small to start a program (the minimum is 16M). "
                          "Fix: --memory 16M or more" % (value,))
    return size


def _env_items(instance, attribute, value):
    for item in value:
        name = item.split("=", 1)[0]
        if not _ENV_NAME.match(name):
            raise ConfigError(
                "--env %r: expected NAME (keep it from the host) or NAME=VALUE (set it)" % item
            )


def _ports(value):
    ports = []
    for port in _tuple_of_str(value) if not isinstance(value, int) else (value,):
        try:
            number = int(port)
        except ValueError:
            raise ConfigError("--allow-host-port %r: expected a port number 1-65535" % port) from None
        if not 0 < number < 65536:
            raise ConfigError("--allow-host-port %r: expected a port number 1-65535" % port)
        ports.append(number)
    return tuple(ports)


@attrs.frozen(kw_only=True)
class Config:
    """Everything that describes one sandbox.  Field names are the CLI options.

    Filesystem: ``mode`` (default | readonly | hermetic), ``rw``/``ro``/
    ``overlay``/``tmpfs``/``hide`` path lists (when the same path is named
    twice, the later option wins: the CLI keeps the order in ``path_order``),
    ``cwd`` (default: the caller's), ``scratch`` (where overlay changes are
    kept while the sandbox runs), ``keep_changes`` (copy them there at exit).

    Process: ``root`` (map the caller to uid 0 inside), ``hostname``,
    ``env`` (``NAME`` keeps a variable that would be scrubbed, ``NAME=VALUE``
    sets one), ``timeout`` (seconds; SIGTERM then SIGKILL), ``json_status_fd``.

    Hardening (docs/security.md): ``seccomp`` (default | off | a JSON file of
    extra system calls to deny), ``allow_nested`` (let the command create user
    namespaces, e.g. a corral inside), limits ``memory`` (address space,
    bytes or ``512M``), ``pids`` (processes and threads), ``cpu_time``
    (seconds), ``nofile`` (open files), ``fsize`` (largest file written).

    Network: ``net`` (filtered | none | host), ``allow``/``deny``/
    ``allow_file`` rules, ``allow_host_port``, ``publish``, ``dns_upstream``,
    ``policy`` (a .py file with callbacks), ``policy_timeout``, ``data_path``,
    ``events`` (JSON-lines file, ``-`` for stderr).
    """

    mode: str = attrs.field(default="default", validator=_choice(FS_MODES))
    rw: tuple = attrs.field(default=(), converter=_tuple_of_str)
    ro: tuple = attrs.field(default=(), converter=_tuple_of_str)
    overlay: tuple = attrs.field(default=(), converter=_tuple_of_str)
    tmpfs: tuple = attrs.field(default=(), converter=_tuple_of_str)
    hide: tuple = attrs.field(default=(), converter=_tuple_of_str)
    path_order: tuple = attrs.field(
        default=(), converter=lambda v: tuple(tuple(i) for i in v), repr=False
    )
    hide_secrets: bool = True
    cwd: str | None = None
    scratch: str | None = None
    keep_changes: str | None = None

    root: bool = False
    hostname: str = attrs.field(default="corral")
    env: tuple = attrs.field(default=(), converter=_tuple_of_str, validator=_env_items)
    timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    kill_grace: float = attrs.field(default=2.0, validator=_non_negative_seconds)
    json_status_fd: int | None = None
    seccomp: str = attrs.field(default="default", validator=lambda i, a, v: hardening.check_seccomp(v))
    allow_nested: bool = False
    memory: int | None = attrs.field(default=None, converter=_memory)
    tmp_size: int | None = attrs.field(default=1 << 30,
                                       converter=lambda v: hardening.parse_size(v, "--tmp-size"))
    pids: int | None = attrs.field(default=None, converter=lambda v: hardening.parse_count(v, "--pids"))
    cpu_time: int | None = attrs.field(default=None, converter=lambda v: hardening.parse_count(v, "--cpu-time"))
    nofile: int | None = attrs.field(default=None, converter=lambda v: hardening.parse_count(v, "--nofile"))
    fsize: int | None = attrs.field(default=None, converter=lambda v: hardening.parse_size(v, "--fsize"))

    net: str = attrs.field(default="filtered", validator=_choice(NET_MODES))
    allow: tuple = attrs.field(default=(), converter=_tuple_of_str)
    deny: tuple = attrs.field(default=(), converter=_tuple_of_str)
    allow_file: tuple = attrs.field(default=(), converter=_tuple_of_str)
    allow_host_port: tuple = attrs.field(default=(), converter=_ports)
    publish: tuple = attrs.field(default=(), converter=_tuple_of_str)
    dns_upstream: str | None = None
    policy: str | None = None
    policy_timeout: float = attrs.field(default=2.0, validator=_positive_or_none)
    data_path: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_choice(DATA_PATHS))
    )
    events: str | None = None
    pcap: str | None = None  # pcap file of every frame of the sandbox's interface
    max_conns: int | None = attrs.field(default=None, validator=_positive("number of open flows"))
    max_rate: float | None = attrs.field(default=None, validator=_positive("number of new flows per second"))
    monitor: bool = False  # live view of the events (corral.events.monitor)
    report: str | None = None  # audit report (JSON) written at exit
    suggest: str | None = None  # suggested allowlist written at exit
    audit: bool = False

    @hostname.validator
    def _check_hostname(self, attribute, value):
        if not value or len(value) > 64 or "/" in value or "\0" in value:
            raise ConfigError("--hostname %r: expected 1-64 characters, no '/'" % value)

    @path_order.validator
    def _check_order(self, attribute, value):
        for item in value:
            if len(item) != 2 or item[0] not in PATH_ACTIONS:
                raise ConfigError("path_order items are (action, path) with action in %s" % (PATH_ACTIONS,))

    def path_actions(self):
        """The (action, path) list in the order the user gave it; later wins."""
        if self.path_order:
            return tuple(self.path_order)
        return tuple((action, path) for action in PATH_ACTIONS for path in getattr(self, action))

    def sandbox_env(self, environ=None):
        """The command's environment: the caller's, minus credential-looking
        variables, plus what ``env`` keeps or sets."""
        environ = os.environ if environ is None else environ
        result = {}
        for name, value in environ.items():
            if not looks_secret(name):
                result[name] = value
        for item in self.env:
            name, sep, value = item.partition("=")
            if sep:
                result[name] = value
            elif name in environ:
                result[name] = environ[name]
        return result
