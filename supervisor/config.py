"""The sandbox's configuration: one attrs class, one field per CLI option.

``corral run --rw DIR --net none -- cmd`` and ``corral.Config(rw=[DIR],
net="none")`` are the same thing; :meth:`Config.from_cli` is the bridge.
Validation happens here (types, choices, ranges); checks that need the
filesystem (does a path exist?) happen when the mount plan is built, and both
raise :class:`corral.errors.ConfigError`.
"""

import functools
import os
import re

import attrs

from . import hardening
from .errors import ConfigError

FS_MODES = ("default", "readonly", "hermetic")
NET_MODES = ("filtered", "none", "host")
DATA_PATHS = ("direct", "pump")
PATH_ACTIONS = ("rw", "ro", "overlay", "tmpfs", "hide")

# The environment scrub (docs/security.md, "Environment"): a variable is dropped when
# its NAME matches a rule below (case-insensitively, the whole name; `*` matches anything) and is not one
# of the harmless names, or when its VALUE has the shape of a credential.  ``--env NAME``
# keeps one anyway.  Each rule: (pattern, what it catches).
SECRET_ENV_PATTERNS = (
    ("*TOKEN*", "tokens: GITHUB_TOKEN, NPM_AUTHTOKEN, CARGO_REGISTRY_TOKEN"),
    ("*SECRET*", "secrets: AWS_SECRET_ACCESS_KEY, CLIENT_SECRET"),
    ("*PASSW*", "passwords: DB_PASSWORD, PGPASSWORD, MYSQL_PWD's cousins"),
    ("*PASSPHRASE*", "passphrases: GPG_PASSPHRASE"),
    ("*_PASS", "passwords: SMTP_PASS"),
    ("*_PWD", "passwords: MYSQL_PWD (PWD and OLDPWD are kept)"),
    ("PAT", "personal access tokens"),
    ("*_PAT", "personal access tokens: GH_PAT, GITHUB_PAT"),
    ("*JWT*", "JSON web tokens: CI_JOB_JWT"),
    ("KEY", "keys"),
    ("*_KEY", "keys: OPENAI_API_KEY, DEPLOY_KEY"),
    ("*_KEYS", "keys"),
    ("*_KEY_*", "keys: AWS_ACCESS_KEY_ID"),
    ("*APIKEY*", "API keys: SENDGRID_APIKEY"),
    ("*AUTH*", "auth material: NPM_CONFIG__AUTH, HTTP_AUTHORIZATION, SSH_AUTH_SOCK"),
    ("*COOKIE*", "cookies: COOKIE, SESSION_COOKIE"),
    ("*WEBHOOK*", "webhook URLs (the URL is the credential): SLACK_WEBHOOK_URL"),
    ("*CREDENTIAL*", "credentials: GOOGLE_APPLICATION_CREDENTIALS, AWS_SHARED_CREDENTIALS_FILE"),
    ("*CREDS*", "credentials: DOCKER_CREDS"),
    ("*PRIVATE*", "private keys: PRIVATE_KEY_PEM, SIGNING_PRIVATE"),
    ("NPM_CONFIG_//*", "npm per-registry settings (_authToken, _auth, _password, certfile)"),
    ("YARN_NPM_*", "yarn registry settings: YARN_NPM_AUTH_IDENT"),
    ("POETRY_HTTP_BASIC_*", "poetry repository logins: POETRY_HTTP_BASIC_PRIVATE_USERNAME"),
    ("POETRY_PYPI_*", "poetry upload tokens"),
    ("UV_INDEX_*_USERNAME", "uv index logins"),
    ("TWINE_USERNAME", "twine upload login"),
    ("DOCKER_AUTH_CONFIG", "docker registry logins"),
    ("AWS_*", "AWS: AWS_PROFILE, AWS_SESSION_TOKEN"),
    ("AZURE_*", "Azure: AZURE_CLIENT_ID"),
    ("GCLOUD_*", "Google Cloud"),
    ("VAULT_*", "HashiCorp Vault: VAULT_ADDR, VAULT_TOKEN"),
    ("GPG_AGENT_INFO", "the GPG agent"),
    ("DBUS_SESSION_BUS_ADDRESS", "the D-Bus session bus"),
    ("KRB5CCNAME", "Kerberos tickets"),
    ("OP_SESSION_*", "1Password CLI session tokens"),
    ("BW_SESSION", "Bitwarden CLI session key"),
)
# Harmless names a pattern above would catch: kept.
HARMLESS_ENV_NAMES = (
    ("XAUTHORITY", "a path to the X cookie file, not the cookie (X is unreachable inside anyway)"),
    ("ICEAUTHORITY", "a path to the ICE cookie file, as XAUTHORITY"),
    ("GIT_AUTHOR_*", "git identity: GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL, GIT_AUTHOR_DATE"),
    ("TOKENIZERS_PARALLELISM", "a Hugging Face tokenizers setting"),
)
# Value shapes of credentials, whatever the name: (name, literal markers, regular
# expression).  A regex is compiled and tried only for a value holding one of its
# markers (most environments hold none: no compile cost on the start-up path).
SECRET_ENV_VALUES = (
    ("url-password", ("://",), r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*:[^/?#@\s]+@"),
    ("jwt", ("eyJ",), r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    ("github-token", ("gh", "github_pat_"), r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    ("gitlab-token", ("gl",), r"\bgl(?:pat|dt|rt|cbt|ptt|ft)-[A-Za-z0-9_-]{16,}"),
    ("slack-token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{8,}"),
    ("aws-access-key", ("AKIA", "ASIA"), r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    ("api-key", ("sk-", "rk-"), r"\b(?:sk|rk)-[A-Za-z0-9_-]{20,}"),
    ("stripe-key", ("_live_", "_test_"), r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"),
    ("npm-token", ("npm_",), r"\bnpm_[A-Za-z0-9]{30,}"),
    ("pypi-token", ("pypi-AgE",), r"\bpypi-AgE[A-Za-z0-9_-]{16,}"),
    ("huggingface-token", ("hf_",), r"\bhf_[A-Za-z0-9]{30,}"),
    ("google-api-key", ("AIza",), r"\bAIza[A-Za-z0-9_-]{35}"),
    ("private-key", ("PRIVATE KEY",), r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _glob(upper, pattern):
    """fnmatch for the ``*``-only patterns above, without compiling a regex."""
    first, *rest = pattern.split("*")
    if not rest:
        return upper == pattern
    *middle, last = rest
    if len(upper) < len(first) + len(last) or not upper.startswith(first) or not upper.endswith(last):
        return False
    pos, end = len(first), len(upper) - len(last)
    for part in middle:
        pos = upper.find(part, pos, end)
        if pos < 0:
            return False
        pos += len(part)
    return True


def _literals(patterns):
    # (the longest literal part, pattern): a cheap substring test before the glob
    return tuple((max(p.split("*"), key=len), p) for p, _ in patterns)


_NAME_RULES = _literals(SECRET_ENV_PATTERNS)
_HARMLESS_RULES = _literals(HARMLESS_ENV_NAMES)


@functools.lru_cache(maxsize=None)
def _value_regex(name):
    return re.compile(next(r for n, _, r in SECRET_ENV_VALUES if n == name))


def looks_secret(name, value=None):
    """True when the variable *name* (with *value*, if given) looks like a credential."""
    upper = name.upper()
    if any(lit in upper and _glob(upper, p) for lit, p in _NAME_RULES) and not any(
        lit in upper and _glob(upper, p) for lit, p in _HARMLESS_RULES
    ):
        return True
    if value is None:
        return False
    return any(
        any(m in value for m in markers) and _value_regex(shape).search(value)
        for shape, markers, _ in SECRET_ENV_VALUES
    )


def _tuple_of_str(value):
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike)):
        value = [value]
    return tuple(os.fspath(v) for v in value)


def _paths(value):
    """Mount paths: a relative one is resolved against the caller's working directory
    now, as every CLI user expects (``rw=["./out"]``)."""
    return tuple(os.path.abspath(p) for p in _tuple_of_str(value))


def _path_order(value):
    order = []
    for item in value:
        item = tuple(item)
        if len(item) != 2:
            raise ConfigError("path_order items are (action, path) pairs, not %r" % (item,))
        order.append((item[0], os.path.abspath(os.fspath(item[1]))))
    return tuple(order)


def _path_or_none(value):
    return None if value is None else os.path.abspath(os.fspath(value))


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
    kept while the sandbox runs), ``keep_changes`` (copy them there at exit),
    ``allow_socket`` (host unix sockets the command may connect to; every
    other one is unreachable), ``allow_persist`` (let the command change what the
    host runs later — git hooks and config in writable directories; see
    docs/security.md).

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
    ``attribution`` (name the process behind each flow; False saves its cost),
    ``events`` (JSON-lines file, ``-`` for stderr), limits ``max_conns``, ``max_rate``
    (flows), ``max_dns_rate``, ``max_dns_pending`` (DNS queries).
    """

    mode: str = attrs.field(default="default", validator=_choice(FS_MODES))
    rw: tuple = attrs.field(default=(), converter=_paths)
    ro: tuple = attrs.field(default=(), converter=_paths)
    overlay: tuple = attrs.field(default=(), converter=_paths)
    tmpfs: tuple = attrs.field(default=(), converter=_paths)
    hide: tuple = attrs.field(default=(), converter=_paths)
    path_order: tuple = attrs.field(default=(), converter=_path_order, repr=False)
    hide_secrets: bool = True
    allow_socket: tuple = attrs.field(default=(), converter=_paths)  # host unix sockets shown
    cwd: str | None = attrs.field(default=None, converter=_path_or_none)
    scratch: str | None = None
    keep_changes: str | None = None
    allow_persist: bool = False  # startup files, .git/hooks and .git/config in writable dirs

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
    attribution: bool = True  # name the process behind each flow and query (corral.net.owner)
    data_path: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_choice(DATA_PATHS))
    )
    events: str | None = None
    pcap: str | None = None  # pcap file of every frame of the sandbox's interface
    max_conns: int | None = attrs.field(default=None, validator=_positive("number of open flows"))
    max_rate: float | None = attrs.field(default=None, validator=_positive("number of new flows per second"))
    # DNS queries per second / at once (None: unlimited); defaults in supervisor/net/dns.py
    max_dns_rate: float | None = attrs.field(default=200.0,
                                             validator=_positive("number of DNS queries per second"))
    max_dns_pending: int | None = attrs.field(default=64,
                                              validator=_positive("number of pending DNS queries"))
    monitor: bool = False  # live view of the events (corral.events.monitor)
    report: str | None = None  # audit report (JSON) written at exit
    suggest: str | None = None  # suggested allowlist written at exit
    # --suggest-scope: "program" ends each suggested rule in @PROGRAM (docs/policy.md)
    suggest_scope: str = attrs.field(default="none", validator=_choice(("none", "program")))
    baseline: str | None = None  # corral audit --baseline OLD.json: diff the new report against it
    quiet: bool = False  # no "denied …, allow with --allow …" hints on stderr
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
        return self.scrub_env(environ)[0]

    def scrub_env(self, environ=None):
        """``(environment, dropped)``: :meth:`sandbox_env` and the sorted NAMES of the
        caller's variables it left out (never their values)."""
        environ = os.environ if environ is None else environ
        keep = {item.partition("=")[0] for item in self.env}
        result, dropped = {}, []
        for name, value in environ.items():
            if name in keep or not looks_secret(name, value):
                result[name] = value
            else:
                dropped.append(name)
        for item in self.env:
            name, sep, value = item.partition("=")
            if sep:
                result[name] = value
        return result, sorted(dropped)
