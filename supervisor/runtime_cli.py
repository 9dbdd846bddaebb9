"""`corral ps|logs|stop|exec`: the command line for running sandboxes
(the registry is :mod:`corral.state`).  Like ``cli.py``, this module prints."""

import argparse
import json
import shlex
import sys
import time

COMMANDS = ("ps", "logs", "stop", "exec")


def add_parsers(sub):
    p = sub.add_parser("ps", help="list running sandboxes")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p = sub.add_parser("logs", help="print the events of a running sandbox")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    p.add_argument("--json", action="store_true", help="the raw JSON lines")
    p.add_argument("id", metavar="ID", help="sandbox id or a unique prefix (see `corral ps`)")
    p = sub.add_parser("stop", help="stop running sandboxes (SIGTERM, then SIGKILL)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="SIGKILL everything inside after SECONDS (default 10)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p = sub.add_parser("exec", help="run CMD inside a running sandbox (same files, network "
                       "policy and restrictions)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set a variable for CMD (repeatable)")
    p.add_argument("--cwd", help="working directory inside (default: the sandbox's)")
    p.add_argument("id", metavar="ID")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")


def main(args, say):
    """Run one of :data:`COMMANDS`; return the exit status."""
    from .errors import ConfigError, CorralError

    try:
        return globals()["_" + args.command](args, say)
    except ConfigError as exc:
        say(str(exc))
        return 2
    except CorralError as exc:
        say(str(exc))
        return getattr(exc, "exit_code", 125)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `corral logs -f ID | head`
        return 0


# ---------------------------------------------------------------- ps


def _ps(args, say):
    from . import state

    now = time.time()
    rows = []
    for entry in state.list_running():
        rows.append({
            "id": entry.id, "argv": entry.argv, "cwd": entry.info.get("cwd"),
            "net": entry.net, "supervisor_pid": entry.supervisor_pid, "d_pid": entry.d_pid,
            "command_pid": entry.info.get("command_pid"), "started": entry.started,
            "age": round(now - entry.started, 3),
            "conns": state.open_connections(state.read_events(entry)),
        })
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    table = [("ID", "PID", "AGE", "CONNS", "NET", "COMMAND")]
    table += [(r["id"], str(r["supervisor_pid"]), _age(r["age"]), str(r["conns"]),
               _safe(r["net"] or "-"), _safe(shlex.join(r["argv"]))) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        sys.stdout.write("  ".join(cells + [_clip(row[5], 60)]) + "\n")
    return 0


def _age(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return "%ds" % seconds
    if seconds < 7200:
        return "%dm" % (seconds // 60)
    if seconds < 172800:
        return "%dh" % (seconds // 3600)
    return "%dd" % (seconds // 86400)


def _clip(text, width):
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------- logs


def _logs(args, say):
    from . import state

    entry = state.find(args.id)
    events = state.follow_events(entry) if args.follow else state.read_events(entry)
    for event in events:
        # ASCII JSON: no control character of the sandbox's reaches the terminal raw
        line = json.dumps(event, separators=(",", ":")) if args.json else format_event(event)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return 0


def format_event(ev):
    """One human line for an event record (docs/events.md), with what the
    sandbox chose (argv, names, answers) escaped: no control characters."""
    return _safe(_format_event(ev))


def _format_event(ev):
    kind = ev.get("type", "?")
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("ts", 0)))
    if kind == "sandbox_start":
        text = "start  pid %s  %s" % (ev.get("pid"), shlex.join(ev.get("argv") or []))
    elif kind == "sandbox_exit":
        text = "exit   %s%s" % (ev.get("exit_code"),
                                " (signal %s)" % ev["signal"] if ev.get("signal") else "")
    elif kind == "connect":
        name = ev.get("name") or ev.get("sni") or ev.get("http_host")
        text = "%-6s %s %s:%s%s  %s (%s)%s" % (
            "conn", ev.get("proto"), _host(ev.get("dst_ip")), ev.get("dst_port"),
            " [%s]" % name if name else "", ev.get("verdict"), ev.get("rule"),
            "  %s" % ev["reason"] if ev.get("reason") else "")
        text += "  #%s" % ev.get("id")
    elif kind == "close":
        text = "close  #%s  out %s B  in %s B  %.2fs  %s" % (
            ev.get("id"), ev.get("bytes_out"), ev.get("bytes_in"), ev.get("duration") or 0.0,
            ev.get("reason"))
    elif kind == "dns":
        answers = ", ".join(str(a.get("data", a)) if isinstance(a, dict) else str(a)
                            for a in ev.get("answers") or ())
        text = "dns    %s %s  %s (%s)  %s%s" % (
            ev.get("qtype"), ev.get("qname"), ev.get("verdict"), ev.get("rule"), ev.get("rcode"),
            "  -> " + answers if answers else "")
    else:
        text = "%-6s %s" % (kind, " ".join("%s=%s" % (k, v) for k, v in ev.items()
                                            if k not in ("type", "ts")))
    return "%s %s" % (stamp, text)


def _safe(text):
    from .events.report import _safe

    return _safe(text)


def _host(ip):
    return "[%s]" % ip if ip and ":" in ip else str(ip)


# ---------------------------------------------------------------- stop


def _stop(args, say):
    from . import state

    entries = [state.find(i) for i in args.ids]  # all or nothing: check every id first
    for entry in entries:
        how = state.stop(entry, grace=args.grace)
        if how == "kill":
            say("sandbox %s did not stop within %gs of SIGTERM; sent SIGKILL" % (entry.id, args.grace))
    return 0


# ---------------------------------------------------------------- exec


def _exec(args, say):
    from . import state
    from .errors import ConfigError

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv  # argparse may eat '--'
    if not argv:
        raise ConfigError("no command given. Fix: corral exec ID -- CMD [ARGS...]")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError("--env %s: expected NAME=VALUE" % item)
        env[name] = value
    entry = state.find(args.id)
    return state.exec_in(entry, argv, env=env, cwd=args.cwd)

