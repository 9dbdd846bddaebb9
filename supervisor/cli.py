"""`corral` command line.  Every option is a Config field of the same name.

The CLI is the only place that prints.  Bad input is one line on stderr and
exit status 2; a sandbox that cannot be set up is one line and 125; otherwise
the exit status is the command's (128+N when killed by signal N).
"""

import argparse
import functools
import gc
import os
import sys

EXIT_USAGE = 2
EXIT_SETUP = 125


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError("%s. Fix: see `%s --help`" % (message, self.prog))


class _PathOption(argparse.Action):
    """--rw/--ro/--overlay/--tmpfs/--hide: keep the order across all five."""

    def __call__(self, parser, namespace, value, option_string=None):
        action = self.dest  # new lists: never the parser's defaults, which outlive a parse
        setattr(namespace, action, [*getattr(namespace, action), value])
        namespace.path_order = [*namespace.path_order, (action, value)]


def _add_sandbox_options(p):
    fs = p.add_argument_group("filesystem")
    fs.add_argument("--mode", choices=("default", "readonly", "hermetic"), default="default",
                    help="default: host visible, writes go to an overlay; readonly: nothing "
                    "writable but cwd and /tmp; hermetic: empty root, only what you mount")
    for name, text in (
        ("rw", "make PATH writable (changes reach the host)"),
        ("ro", "make PATH visible read-only"),
        ("overlay", "make PATH writable inside, changes discarded"),
        ("tmpfs", "mount an empty tmpfs on PATH"),
        ("hide", "make PATH empty/unreadable inside"),
    ):
        fs.add_argument("--" + name, action=_PathOption, default=[], metavar="PATH",
                        help=text + " (repeatable; later options win)")
    fs.add_argument("--allow-socket", action="append", default=[], metavar="PATH",
                    help="let the command connect to this host unix socket, e.g. "
                    "\"$SSH_AUTH_SOCK\" (repeatable; every other one is unreachable)")
    fs.add_argument("--no-hide-secrets", dest="hide_secrets", action="store_false",
                    help="show ~/.ssh, ~/.aws, … (hidden by default)")
    fs.add_argument("--cwd", metavar="DIR",
                    help="working directory inside (default: the current one, writable)")
    fs.add_argument("--scratch", metavar="DIR", help="where overlay changes live while running")
    fs.add_argument("--keep-changes", metavar="DIR", help="keep the overlay changes in DIR")
    fs.add_argument("--allow-persist", action="store_true",
                    help="let the command change what the host runs later in writable dirs "
                    "(.git/hooks, .git/config; a cwd holding startup files): protected by "
                    "default, still flagged by the audit")
    proc = p.add_argument_group("process")
    proc.add_argument("--root", action="store_true", help="map your uid to 0 inside")
    proc.add_argument("--hostname", default="corral", metavar="NAME",
                      help="the sandbox's host name (default: corral)")
    proc.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                      help="keep a scrubbed variable, or set one (repeatable)")
    proc.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="SIGTERM the command after SECONDS (exit 124), SIGKILL after "
                      "--kill-grace more (exit 137)")
    proc.add_argument("--kill-grace", type=float, default=2.0, metavar="SECONDS",
                      help="seconds between SIGTERM and SIGKILL on --timeout (default 2)")
    proc.add_argument("--json-status-fd", type=int, metavar="FD",
                      help='write {"child-pid": N} and {"exit-code": N} lines to FD')
    proc.add_argument("--seccomp", default="default", metavar="off|default|FILE",
                      help="the system call filter (docs/security.md); FILE: a JSON list of "
                      "extra system calls to deny")
    proc.add_argument("--allow-nested", action="store_true",
                      help="let the command create user namespaces (a corral inside corral)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--memory", metavar="BYTES", help="address-space limit, e.g. 512M, 2G")
    limits.add_argument("--tmp-size", metavar="BYTES", default="1G",
                        help="size limit of /tmp, /dev/shm and each --tmpfs (default 1G)")
    limits.add_argument("--pids", type=int, metavar="N", help="at most N processes and threads")
    limits.add_argument("--cpu-time", type=int, metavar="SECONDS",
                        help="CPU seconds, then SIGKILL")
    limits.add_argument("--nofile", type=int, metavar="N", help="at most N open files")
    limits.add_argument("--fsize", metavar="BYTES", help="largest file the command may write")
    limits.add_argument("--max-conns", type=int, metavar="N",
                        help="refuse new flows while N are open (a connection flood inside)")
    limits.add_argument("--max-rate", type=float, metavar="PER_SECOND",
                        help="refuse new flows beyond this many per second (burst: one "
                        "second's worth)")
    limits.add_argument("--max-dns-rate", type=float, default=200.0, metavar="PER_SECOND",
                        help="answer DNS queries beyond this many per second REFUSED "
                        "(default 200; burst: one second's worth)")
    limits.add_argument("--max-dns-pending", type=int, default=64, metavar="N",
                        help="answer DNS queries SERVFAIL while N are being resolved "
                        "(default 64)")
    net = p.add_argument_group("network")
    net.add_argument("--net", choices=("filtered", "none", "host"), default="filtered",
                     help="filtered (default): every flow through corral's netstack and policy; "
                     "none: loopback only; host: the host's network, unfiltered")
    net.add_argument("--allow-host-port", action="append", default=[], metavar="PORT",
                     help="let 10.0.2.2:PORT inside reach 127.0.0.1:PORT on the host "
                     "(repeatable)")
    net.add_argument("--publish", action="append", default=[],
                     metavar="[HOSTIP:]HOSTPORT:SANDBOXPORT[/udp]",
                     help="forward a host port to a port inside the sandbox (repeatable)")
    net.add_argument("--dns-upstream", metavar="IP[:PORT]",
                     help="resolver for allowed DNS queries (default: the host's resolv.conf)")
    net.add_argument("--no-attribution", dest="attribution", action="store_false",
                     help="do not name the process behind each flow and DNS query (faster "
                     "new connections; rules scoped to a program need it)")
    net.add_argument("--data-path", choices=("direct", "pump"),
                     help="direct: Go moves the frames (default); pump: Python does (chosen "
                     "for on_packet and pcap from Python)")
    policy = p.add_argument_group("policy")
    policy.add_argument("--allow", action="append", default=[], metavar="RULE",
                        help="allow a destination: example.com, *.example.com, "
                        "example.com:443, 203.0.113.0/24, [2001:db8::1]:53/udp (repeatable)")
    policy.add_argument("--deny", action="append", default=[], metavar="RULE",
                        help="deny a destination, same forms as --allow; deny wins "
                        "(repeatable)")
    policy.add_argument("--allow-file", action="append", default=[], metavar="FILE",
                        help="read --allow rules from FILE, one per line, # comments (what "
                        "--suggest writes)")
    policy.add_argument("--policy", metavar="FILE.py",
                        help="load async on_connect/on_claim/on_dns and on_packet callbacks from "
                        "FILE.py")
    policy.add_argument("--policy-timeout", type=float, default=2.0, metavar="SECONDS",
                        help="a callback slower than this is a deny (default 2)")
    out = p.add_argument_group("output")
    out.add_argument("--events", metavar="FILE", help="JSON lines of every event (- = stderr)")
    out.add_argument("--pcap", metavar="FILE", help="write every frame of the sandbox's "
                     "interface, both directions, to FILE (pcap: tshark, Wireshark, scapy)")
    out.add_argument("--monitor", action="store_true",
                     help="show connections and DNS live: redrawn on the terminal when the "
                     "command's output is redirected, else one line per event on stderr")
    out.add_argument("--report", metavar="FILE",
                     help="write the audit report (JSON, schema corral.audit/2) at exit")
    out.add_argument("--suggest", metavar="FILE",
                     help="write an allowlist that `corral run --allow-file` accepts as is")
    out.add_argument("--baseline", metavar="OLD.json",
                     help="corral audit: compare this run's report with OLD.json (as `corral "
                     "diff`) and exit 1 when anything is new")
    out.add_argument("--suggest-scope", choices=("none", "program"), default="none",
                     help="program: scope each suggested rule to the program that used it "
                     "(pypi.org:443/tcp@pip)")
    out.add_argument("--quiet", action="store_true",
                     help="no 'denied …, allow with --allow …' lines on stderr")


EXAMPLES = """\
examples:
  corral run -- make test                          no network, writes outside cwd discarded
  corral run --allow pypi.org --allow '*.pythonhosted.org' -- pip download six
  corral audit --report r.json --suggest allow.txt -- npm install
  corral run --allow-file allow.txt -- npm install  what the audit saw, and nothing else
  corral run --mode hermetic --ro /usr --net none -- /usr/bin/python3 -c 'print(1)'
"""


SANDBOX_COMMANDS = {"run": "run CMD in a sandbox (network denied by default)",
                    "audit": "run CMD with the network open and report what it did"}


@functools.lru_cache(maxsize=None)
def build_parser(only=None):
    """The whole parser; ``only="run"`` (or "audit"): just that command's, which
    parses it alike (start-up: the others' ~60 options and imports are skipped).
    Built once per process: a warm server's workers inherit it ready."""
    parser = _Parser(prog="corral", description="Run untrusted commands in a rootless "
                     "sandbox and see and decide what they do on the network.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for name, text in SANDBOX_COMMANDS.items():
        if only not in (None, name):
            continue
        p = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_sandbox_options(p)
        p.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
        p.set_defaults(path_order=[])
    if only is not None:
        return parser
    sub.add_parser("doctor", help="check that this machine can run sandboxes")
    from .runtime_cli import add_parsers as add_runtime_parsers

    add_runtime_parsers(sub)  # ps, logs, stop, exec
    p = sub.add_parser("diff", help="what NEW.json (an audit report) has that OLD.json has not; "
                       "exit 1 when anything is new, 0 when nothing, 2 for unreadable input")
    p.add_argument("old", metavar="OLD.json")
    p.add_argument("new", metavar="NEW.json")
    p.add_argument("--json", action="store_true", help="the difference as JSON (schema corral.diff/1)")
    p = sub.add_parser("top", help="the live view (as --monitor) of a running sandbox")
    p.add_argument("id", metavar="ID", help="sandbox id or a unique prefix (see `corral ps`)")
    p = sub.add_parser("warm", help="a per-user server that starts sandboxes without "
                       "corral's imports (start-up 2.4-3.7x faster; docs/cli.md)")
    p.add_argument("action", choices=("start", "status", "stop", "serve"),
                   help="start: in the background; serve: in the foreground; status; stop "
                   "(running sandboxes go on)")
    p.add_argument("--idle", type=float, default=1800.0, metavar="SECONDS",
                   help="exit after SECONDS without a run (default 1800; 0: never)")
    p.add_argument("--no-spare", dest="spare", action="store_false",
                   help="keep no sandbox ready for a run like the last one (slower runs, "
                   "nothing idle)")
    return parser


def parse(argv):
    """Return (command, Config | None, argv)."""
    from .config import Config

    parser = build_parser(argv[0] if argv and argv[0] in SANDBOX_COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        raise UsageError("no command given. Fix: corral run [OPTIONS] -- CMD, or corral --help")
    if args.command == "doctor":
        return "doctor", None, []
    if args.command in ("ps", "logs", "stop", "exec", "top", "diff", "warm"):
        return args.command, None, args  # runtime_cli reads the parsed arguments
    if not args.argv or args.argv[0] != "--":
        raise UsageError(
            "missing '--' before the command. Fix: corral %s [OPTIONS] -- CMD [ARGS...]"
            % args.command
        )
    command_argv = args.argv[1:]
    if not command_argv:
        raise UsageError("no command after '--'. Fix: corral %s [OPTIONS] -- CMD [ARGS...]"
                         % args.command)
    fields = vars(args).copy()
    for key in ("command", "argv"):
        fields.pop(key)
    fields["path_order"] = tuple(fields["path_order"])
    fields["audit"] = args.command == "audit"
    return args.command, Config(**fields), command_argv


def _say(text):
    sys.stderr.write("corral: %s\n" % text)


def main(argv=None, started=None):
    """``started``: a sandbox a warm server made ready for this very
    configuration (:meth:`corral.launch.Started.take_command` done)."""
    from .errors import ConfigError, CorralError

    argv = sys.argv[1:] if argv is None else argv
    try:
        command, config, command_argv = parse(argv)
    except (UsageError, ConfigError) as exc:
        _say(str(exc))
        return EXIT_USAGE
    if command not in SANDBOX_COMMANDS:
        _collector_on()
    if command == "doctor":
        from . import doctor

        return doctor.main()
    if command == "top":
        from .events.monitor import main_top

        return main_top(command_argv.id, _say)
    if command == "diff":
        return _diff(command_argv)
    if command == "warm":
        from .warm import server

        return server.main(command_argv, _say)
    if command in ("ps", "logs", "stop", "exec"):
        from . import runtime_cli

        return runtime_cli.main(command_argv, _say)
    baseline = None
    if config.baseline is not None:
        if not config.audit:
            _say("--baseline compares audit reports. Fix: corral audit --baseline OLD.json -- CMD")
            return EXIT_USAGE
        from .events import diff as differ

        try:
            baseline = differ.load_report(config.baseline)
        except ConfigError as exc:
            _say("--baseline: %s" % exc)
            return EXIT_USAGE
    try:
        if (config.net == "filtered" or config.events or config.monitor or config.audit
                or config.report or config.suggest):
            from . import launch

            # stage-1 first (a fork, nothing heavy loaded yet): trio, the network and
            # the policy load while it builds the sandbox; the command waits for them
            if started is None:
                started = launch.start_early(config, command_argv, on_warning=_say)
            try:
                from . import api

                if config.net == "filtered":
                    from .net import service  # noqa: F401 (loaded with the collector off)
                _collector_on()
                result = api.run_config(config, command_argv, on_warning=_say,
                                        on_timeout=_timed_out, started=started)
            finally:
                started.abandon()
        else:
            from . import launch

            _collector_on()
            result = launch.run_blocking(config, command_argv, on_warning=_say,
                                         on_timeout=_timed_out, started=started)
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except CorralError as exc:
        _say(str(exc))
        return getattr(exc, "exit_code", EXIT_SETUP)
    except KeyboardInterrupt:
        return 130
    if config.audit and result.report is not None:
        from .events.report import render_text

        sys.stderr.write(render_text(result.report))
    if result.timed_out == "kill":
        _say("the command did not stop within %gs of SIGTERM; sent SIGKILL" % config.kill_grace)
    if baseline is not None and result.report is not None:
        from .events import diff as differ

        found = differ.diff_reports(baseline, result.report)
        sys.stderr.write(differ.render_diff(found))
        if result.exit_code == 0 and found["count"]:
            return 1
    return result.exit_code


def _diff(args):
    """`corral diff OLD NEW [--json]`: 1 when NEW has anything OLD has not, 0 when
    not, 2 when either file is not a readable audit report."""
    from .errors import ConfigError
    from .events import diff as differ

    try:
        old, new = differ.load_report(args.old), differ.load_report(args.new)
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_USAGE
    found = differ.diff_reports(old, new)
    if args.json:
        import json

        sys.stdout.write(json.dumps(found, indent=2) + "\n")
    else:
        sys.stdout.write(differ.render_diff(found))
    return 1 if found["count"] else 0


def console():
    """The cold ``corral`` (:func:`corral.warm.client.console`, the console
    script, comes here when no warm server serves it).  Exit without the
    interpreter's teardown (about 10 ms of start-up budget, with nothing left to
    flush but stdio).  The cyclic garbage collector is off while corral starts
    (a hundred modules load, ~10-15% of their time goes to collections that find
    nothing); :func:`main` turns it on (:func:`_collector_on`) before the
    supervision runs."""
    gc.disable()
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _collector_on():
    """The garbage collector on again, after the start-up's objects (the loaded
    modules: nothing to collect there) were frozen out of its generations:
    otherwise its first collection walks them all (~40 ms).  Only when
    :func:`console` turned it off (a caller of :func:`main` keeps its own)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _timed_out(seconds):
    _say("timed out after %gs; sent SIGTERM" % seconds)
