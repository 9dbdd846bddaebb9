"""The audit report: what a sandboxed command did, from its events (sans-io).

:func:`build_report` turns the events of one run (the records ``--events`` writes, as
objects or dicts), the file changes (:class:`corral.fs.changes.ChangeSet`) and the exit
status into a JSON-able dict whose ``schema`` is ``corral.audit/1`` (documented in
``docs/report.md``, JSON Schema in ``report.schema.json`` next to this file).
:func:`render_text` is the human summary for stderr and :func:`render_allowlist` the
suggested allowlist, a file ``corral run --allow-file`` accepts as is.

No I/O here except :func:`load_schema` (reads the packaged schema file).
"""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import os
import time
from typing import Any, Iterable, Mapping

from corral.errors import ConfigError
from corral.fs.persist import is_persistence
from corral.policy import Rule, always_denied, claimed_name, normalize_ip, normalize_name

__all__ = [
    "CORRAL_RESOLVERS",
    "EXECUTABLE_SUFFIXES",
    "SCHEMA",
    "WATCHED_SERVICES",
    "build_report",
    "label_entropy",
    "load_schema",
    "render_allowlist",
    "render_text",
]

SCHEMA = "corral.audit/1"
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "report.schema.json")

CORRAL_RESOLVERS = frozenset({ipaddress.ip_address("10.0.2.3"), ipaddress.ip_address("fd00::3")})
DNS_PORTS = frozenset({53, 853})

# DNS exfiltration heuristics (docs/report.md explains the numbers).
LONG_LABEL = 50  # characters in one label (the maximum is 63)
ENTROPY_MIN_LENGTH = 24  # labels shorter than this are not scored
ENTROPY_BITS = 3.6  # Shannon entropy per character; hex tops out at 4.0, base32 at 5.0
LONG_NAME = 120  # characters in the whole name
SUBDOMAIN_BURST = 30  # distinct names queried under one parent domain

# Webhook, paste, file-drop, tunnel and out-of-band interaction services: a name equal to
# or below one of these is flagged. Where data goes when a tool phones home.
WATCHED_SERVICES: dict[str, str] = {
    **dict.fromkeys(("webhook.site", "requestbin.com", "requestbin.net", "pipedream.net", "hookbin.com",
                     "requestcatcher.com", "beeceptor.com", "mockbin.org", "postb.in", "ptsv2.com",
                     "ptsv3.com", "webhook.cool"), "webhook"),
    **dict.fromkeys(("discord.com", "discordapp.com", "hooks.slack.com", "api.telegram.org"), "chat webhook"),
    **dict.fromkeys(("pastebin.com", "paste.ee", "hastebin.com", "dpaste.com", "dpaste.org", "ghostbin.com",
                     "termbin.com", "ix.io", "paste.rs", "rentry.co", "justpaste.it"), "paste"),
    **dict.fromkeys(("transfer.sh", "file.io", "0x0.st", "temp.sh", "bashupload.com", "oshi.at",
                     "gofile.io", "anonfiles.com", "catbox.moe", "litterbox.catbox.moe"), "file drop"),
    **dict.fromkeys(("ngrok.io", "ngrok.app", "ngrok.dev", "ngrok-free.app", "ngrok-free.dev",
                     "trycloudflare.com", "loca.lt", "localtunnel.me", "serveo.net", "localhost.run",
                     "lhr.life", "pagekite.me", "telebit.io", "bore.pub", "localxpose.io"), "tunnel"),
    **dict.fromkeys(("interact.sh", "oast.fun", "oast.pro", "oast.live", "oast.site", "oast.online",
                     "oast.me", "burpcollaborator.net", "oastify.com", "canarytokens.com", "dnslog.cn",
                     "ceye.io", "dnslog.link"), "out-of-band probe"),
    **dict.fromkeys(("dns.google", "cloudflare-dns.com", "mozilla.cloudflare-dns.com", "one.one.one.one",
                     "dns.quad9.net", "doh.opendns.com", "dns.adguard.com", "doh.cleanbrowsing.org",
                     "dns.nextdns.io"), "DNS-over-HTTPS"),
}

EXECUTABLE_SUFFIXES = (".sh", ".bash", ".exe", ".elf", ".bin", ".py", ".pl", ".ps1", ".bat", ".cmd",
                       ".dll", ".so", ".dylib", ".jar", ".msi", ".appimage", ".run", ".deb", ".rpm", ".apk")

_SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}


def label_entropy(label: str) -> float:
    """Shannon entropy of *label*'s characters, in bits per character."""
    if not label:
        return 0.0
    n = len(label)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(label.lower()).values())


def load_schema() -> dict:
    """The JSON Schema of the report (``report.schema.json``)."""
    with open(SCHEMA_FILE, encoding="utf-8") as f:
        return json.load(f)


# -- input normalization ---------------------------------------------------------------------


def _as_dict(event: Any) -> dict:
    if isinstance(event, Mapping):
        return dict(event)
    to_dict = getattr(event, "to_dict", None)
    if to_dict is None:
        raise ConfigError(f"not an event: {event!r} (expected a corral event or its to_dict())")
    return to_dict()


def _ip(text: str | None):
    try:
        return normalize_ip(text) if text else None
    except ValueError:
        return None


def _addr(ip: str, port: int | None) -> str:
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _watched(name: str | None) -> tuple[str, str] | None:
    if not name:
        return None
    name = normalize_name(name)
    parts = name.split(".")
    for i in range(len(parts)):
        suffix = ".".join(parts[i:])
        if suffix in WATCHED_SERVICES:
            return suffix, WATCHED_SERVICES[suffix]
    return None


def _safe(text: Any) -> str:
    """Text fit for one line (comments, terminal): no control characters."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _is_corral_dns(flow: dict) -> bool:
    return flow["dst"] in CORRAL_RESOLVERS and flow["dst_port"] in DNS_PORTS


# -- the report ------------------------------------------------------------------------------


def _flows(events: list[dict]) -> list[dict]:
    """Connect events joined with their close events."""
    closes = {e["id"]: e for e in events if e.get("type") == "close"}
    flows = []
    for e in events:
        if e.get("type") != "connect":
            continue
        close = closes.get(e["id"])
        names = [normalize_name(n) for n in e.get("names") or ()]
        name = names[0] if names else claimed_name(e.get("sni")) or claimed_name(e.get("http_host"))
        if name and _ip(name) is not None:
            name = None  # a claimed address is no name
        flows.append({
            "id": e["id"], "proto": e["proto"], "dst_ip": e["dst_ip"], "dst": _ip(e["dst_ip"]),
            "dst_port": e["dst_port"], "names": names, "name": name,
            "sni": e.get("sni"), "http_host": e.get("http_host"),
            "http_method": e.get("http_method"), "http_path": e.get("http_path"),
            "verdict": e["verdict"], "rule": e["rule"], "reason": e.get("reason"), "dial": e.get("dial"),
            "ts": e["ts"], "end": close["ts"] if close else None,
            "bytes_out": close.get("bytes_out", 0) if close else 0,
            "bytes_in": close.get("bytes_in", 0) if close else 0,
            "closed": close is not None, "close_reason": close.get("reason") if close else None,
        })
    return flows


def _destinations(flows: list[dict]) -> list[dict]:
    groups: dict[str, dict] = {}
    for f in flows:
        if _is_corral_dns(f):
            continue
        key = normalize_name(f["name"]) if f["name"] else f["dst_ip"]
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "name": normalize_name(f["name"]) if f["name"] else None, "ips": [], "endpoints": [],
                "connections": 0, "allowed": 0, "denied": 0, "bytes_out": 0, "bytes_in": 0,
                "first": f["ts"], "last": f["ts"], "rules": [], "sni": [], "http_hosts": [],
                "http_requests": [], "dns_names": [], "_endpoints": {},
            }
        g["connections"] += 1
        g["allowed" if f["verdict"] == "allow" else "denied"] += 1
        g["bytes_out"] += f["bytes_out"]
        g["bytes_in"] += f["bytes_in"]
        g["first"] = min(g["first"], f["ts"])
        g["last"] = max(g["last"], f["end"] or f["ts"])
        for field, value in (("ips", f["dst_ip"]), ("rules", f["rule"]), ("sni", f["sni"]),
                             ("http_hosts", f["http_host"])):
            if value and value not in g[field]:
                g[field].append(value)
        for n in f["names"]:
            if n not in g["dns_names"]:
                g["dns_names"].append(n)
        if f["http_path"] and len(g["http_requests"]) < 20:
            req = f"{f['http_method'] or '?'} {f['http_path']}"
            if req not in g["http_requests"]:
                g["http_requests"].append(req)
        ek = (f["proto"], f["dst_port"])
        ep = g["_endpoints"].get(ek)
        if ep is None:
            ep = g["_endpoints"][ek] = {"proto": f["proto"], "port": f["dst_port"], "connections": 0,
                                         "allowed": 0, "denied": 0, "bytes_out": 0, "bytes_in": 0}
            g["endpoints"].append(ep)
        ep["connections"] += 1
        ep["allowed" if f["verdict"] == "allow" else "denied"] += 1
        ep["bytes_out"] += f["bytes_out"]
        ep["bytes_in"] += f["bytes_in"]
    out = []
    for g in groups.values():
        del g["_endpoints"]
        g["endpoints"].sort(key=lambda e: (e["proto"], e["port"]))
        out.append(g)
    # denied destinations first, then by traffic
    out.sort(key=lambda g: (g["denied"] == 0, -(g["bytes_out"] + g["bytes_in"]), g["name"] or "", g["ips"]))
    return out


def _names(dns: list[dict]) -> list[dict]:
    groups: dict[str, dict] = {}
    for e in dns:
        qname = normalize_name(e["qname"])
        g = groups.setdefault(qname, {
            "name": qname, "queries": 0, "types": [], "allowed": 0, "denied": 0, "rcodes": [],
            "answers": [], "first": e["ts"], "last": e["ts"],
        })
        g["queries"] += 1
        g["allowed" if e["verdict"] == "allow" else "denied"] += 1
        g["first"], g["last"] = min(g["first"], e["ts"]), max(g["last"], e["ts"])
        if e["qtype"] not in g["types"]:
            g["types"].append(e["qtype"])
        if e.get("rcode") and e["rcode"] not in g["rcodes"]:
            g["rcodes"].append(e["rcode"])
        for a in e.get("answers") or ():
            item = {"type": a["type"], "value": a["value"]}
            if a["name"] and normalize_name(a["name"]) != qname:
                item["owner"] = normalize_name(a["name"])
            if item not in g["answers"]:
                g["answers"].append(item)
    return sorted(groups.values(), key=lambda g: g["first"])


def _denials(flows: list[dict], dns: list[dict]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for f in flows:
        if f["verdict"] == "allow" or _is_corral_dns(f):
            continue
        what = f"{f['proto']} {_addr(f['dst_ip'], f['dst_port'] if f['proto'] != 'icmp' else None)}"
        key = ("connect", what, f["rule"])
        g = groups.setdefault(key, {
            "kind": "connect", "subject": what, "name": normalize_name(f["name"]) if f["name"] else None,
            "rule": f["rule"], "reason": f["reason"], "count": 0, "first": f["ts"], "last": f["ts"],
        })
        g["count"] += 1
        g["last"] = max(g["last"], f["ts"])
    for e in dns:
        if e["verdict"] == "allow":
            continue
        qname = normalize_name(e["qname"])
        key = ("dns", qname, e["rule"])
        g = groups.setdefault(key, {
            "kind": "dns", "subject": f"{qname} {e['qtype']}", "name": qname, "rule": e["rule"],
            "reason": e.get("reason"), "count": 0, "first": e["ts"], "last": e["ts"],
        })
        g["count"] += 1
        g["last"] = max(g["last"], e["ts"])
    return sorted(groups.values(), key=lambda g: g["first"])


class _Flags:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], dict] = {}

    def add(self, kind: str, severity: str, subject: str, detail: str) -> None:
        item = self.items.get((kind, subject))
        if item is None:
            self.items[(kind, subject)] = {"kind": kind, "severity": severity, "subject": subject,
                                           "detail": detail, "count": 1}
        else:
            item["count"] += 1

    def sorted(self) -> list[dict]:
        return sorted(self.items.values(), key=lambda f: (_SEVERITY_ORDER[f["severity"]], f["kind"], f["subject"]))


def _flag_dns(flags: _Flags, dns: list[dict]) -> None:
    under: dict[str, set[str]] = collections.defaultdict(set)
    for e in dns:
        qname = normalize_name(e["qname"])
        labels = qname.split(".")
        if len(labels) > 2:
            under[".".join(labels[1:])].add(qname)
        if len(qname) >= LONG_NAME:
            flags.add("dns-exfil", "high", qname, f"name of {len(qname)} characters (threshold {LONG_NAME})")
            continue
        for label in labels:
            if len(label) >= LONG_LABEL:
                flags.add("dns-exfil", "high", qname,
                          f"label of {len(label)} characters (threshold {LONG_LABEL})")
                break
            if len(label) >= ENTROPY_MIN_LENGTH and label_entropy(label) >= ENTROPY_BITS:
                flags.add("dns-exfil", "medium", qname,
                          f"high-entropy label {label!r}: {label_entropy(label):.2f} bits/char "
                          f"(threshold {ENTROPY_BITS} for labels of {ENTROPY_MIN_LENGTH}+ characters)")
                break
        hit = _watched(qname)
        if hit:
            flags.add("watched-service", "medium", hit[0], f"{hit[1]} service: resolved {qname}")
    for parent, names in under.items():
        if len(names) >= SUBDOMAIN_BURST:
            flags.add("dns-exfil", "medium", "*." + parent,
                      f"{len(names)} distinct names queried below {parent} (threshold {SUBDOMAIN_BURST})")


def _flag_flows(flags: _Flags, flows: list[dict]) -> None:
    for f in flows:
        dst, port, proto = f["dst"], f["dst_port"], f["proto"]
        where = f"{proto} {_addr(f['dst_ip'], port if proto != 'icmp' else None)}"
        verdict = "denied" if f["verdict"] != "allow" else "allowed"
        if _is_corral_dns(f):
            continue
        if f["rule"].startswith("allow-host-port:"):
            continue
        hit = always_denied(dst) if dst is not None else None
        if hit is not None:
            category = hit[0]
            severity = "high" if category == "metadata" else "medium" if category != "multicast" else "low"
            flags.add("always-denied", severity, where, f"{category} destination ({verdict})")
            continue
        if proto in ("tcp", "udp") and port in DNS_PORTS:
            flags.add("foreign-resolver", "high", where,
                      f"DNS{' over TLS' if port == 853 else ''} to a resolver other than corral's "
                      f"10.0.2.3 / fd00::3 ({verdict}): bypasses DNS policy and logging")
        elif not f["names"] and proto != "icmp":
            claimed = [c for c in (f["sni"], f["http_host"]) if c]
            detail = "destination address never resolved through corral's DNS"
            if claimed:
                detail += f"; the client named {_safe(claimed[0])!r}"
            flags.add("raw-ip", "medium", where, f"{detail} ({verdict})")
        for name in {*(f["names"][:1]), claimed_name(f["sni"]), claimed_name(f["http_host"])} - {None}:
            hit = _watched(name)
            if hit:
                flags.add("watched-service", "medium", hit[0], f"{hit[1]} service: connected to {name} ({verdict})")
        path = f["http_path"]
        if path:
            bare = path.split("?", 1)[0].split("#", 1)[0].lower()
            if bare.endswith(EXECUTABLE_SUFFIXES):
                host = claimed_name(f["http_host"]) or f["name"] or f["dst_ip"]
                flags.add("second-stage", "medium", f"{host}{_safe(path)}",
                          f"fetched what looks like an executable or script ({verdict})")


def _flag_files(flags: _Flags, changes: list[dict]) -> None:
    new_repos = tuple(c["path"] + "/" for c in changes
                      if c["change"] == "created" and os.path.basename(c["path"]) == ".git")
    for c in changes:
        path = c["path"]
        if c["change"] == "created" and os.path.basename(path) == ".git":
            flags.add("persistence", "medium", path, "created a git repository: the host's git would obey "
                      "its config and hooks there (check before running git in it)")
        elif c["change"] in ("created", "modified") and c["kind"] == "file":
            if path.startswith(new_repos):
                continue  # the new repository's own flag says it
            why = is_persistence(path)  # files whose change makes code run again later
            if why:
                flags.add("persistence", "high", path, f"{c['change']} {why}")
            elif c["executable"] and c.get("content_changed") is not False:
                flags.add("executable-written", "medium", path, f"{c['change']} an executable file")


def _changes_dict(changes: Any) -> dict | None:
    if changes is None:
        return None
    if hasattr(changes, "to_dict"):
        return changes.to_dict()
    return dict(changes)


def _suggestions(flows: list[dict], names: list[dict]) -> tuple[list[dict], list[str]]:
    """Rules that allow the run's allowed flows and nothing more; see render_allowlist."""
    rules: dict[str, dict] = {}
    notes: list[str] = []

    def add(text: str, why: str, flow: dict) -> None:
        r = rules.setdefault(text, {"rule": text, "comment": why, "connections": 0, "bytes_out": 0, "bytes_in": 0})
        r["connections"] += 1
        r["bytes_out"] += flow["bytes_out"]
        r["bytes_in"] += flow["bytes_in"]

    def exact_name_rule(name: str, f: dict) -> str | None:
        """``name:port/proto`` when *name* parses as one exact domain (no wildcard, no address)."""
        text = f"{name}:{f['dst_port']}/{f['proto']}"
        try:
            rule = Rule.parse(text)
        except ConfigError:
            return None
        return text if rule.kind == "domain" else None

    contacted = set()
    for f in flows:
        if f["verdict"] != "allow" or _is_corral_dns(f):
            continue
        if f["rule"].startswith("allow-host-port:"):
            note = f"{_addr(f['dst_ip'], f['dst_port'])} (the host's loopback) needs --allow-host-port {f['dst_port']}"
            if note not in notes:
                notes.append(note)
            continue
        ip_rule = f"{_addr(f['dst_ip'], f['dst_port'])}/{f['proto']}" if ":" not in f["dst_ip"] else \
            f"[{f['dst_ip']}]:{f['dst_port']}/{f['proto']}"
        if f["proto"] == "icmp":
            target = f["names"][0] if f["names"] else f["dst_ip"]
            note = f"ICMP to {target} was allowed; only a rule without a port allows ICMP: {target}"
            if note not in notes:
                notes.append(note)
            continue
        hit = always_denied(f["dst"]) if f["dst"] is not None else None
        if hit is not None:
            # A rule file never opens the always-denied set: only the user's own --allow does.
            note = (f"{ip_rule} is a {hit[0]} address, always denied; this run opened it with {f['rule']}. "
                    f"No rule file can open it: pass --allow {f['dst_ip']} on the command line if you mean it")
            if note not in notes:
                notes.append(note)
            continue
        # A rule comes only from what the flow reached: a name the sandbox resolved to this
        # address, else the address. SNI / Host are what the client claims: comments only.
        claimed = [c for c in (claimed_name(f["sni"]), claimed_name(f["http_host"])) if c]
        named = [(n, t) for n in f["names"] for t in [exact_name_rule(n, f)] if t]
        if named:
            name, text = named[0]
            contacted.add(name)
            add(text, f"resolved {name}", f)
            for c in dict.fromkeys(claimed):
                if c not in f["names"]:
                    note = (f"the client named {c!r} (TLS SNI / HTTP Host) on its flow to {name}:{f['dst_port']}; "
                            "a claimed name is no rule: corral run denies such a flow unless you allow that "
                            "name yourself")
                    if note not in notes:
                        notes.append(note)
            continue
        why = "no DNS name was looked up for this address"
        if f["proto"] in ("tcp", "udp") and f["dst_port"] in DNS_PORTS:
            why = "DNS to a resolver other than corral's (bypasses DNS policy): consider removing this line"
        if claimed:
            why += f"; the client named {claimed[0]}"
        add(ip_rule, why, f)
    flow_names = {x for f in flows for x in f["names"]}
    for n in names:
        if n["allowed"] and n["name"] not in contacted and n["name"] not in flow_names:
            notes.append(f"resolved {n['name']} but never connected to it (no rule: in `corral run` "
                         "the query is refused)")
    out = list(rules.values())
    return out, notes


def build_report(
    events: Iterable[Any], *, changes: Any = None, exit_code: int | None = None, generated: float | None = None,
) -> dict:
    """The ``corral.audit/1`` report of one run.

    *events*: the run's events (corral event objects or their ``to_dict()``); *changes*: a
    :class:`corral.fs.changes.ChangeSet` (or its ``to_dict()``), ``None`` when the mode
    records none; *exit_code*: overrides the ``sandbox_exit`` event's.
    """
    evs = [_as_dict(e) for e in events]
    start = next((e for e in evs if e.get("type") == "sandbox_start"), None)
    end = next((e for e in reversed(evs) if e.get("type") == "sandbox_exit"), None)
    dns = [e for e in evs if e.get("type") == "dns"]
    flows = _flows(evs)
    errors = [e for e in evs if e.get("type") == "policy_error"]
    files = _changes_dict(changes)

    flags = _Flags()
    _flag_dns(flags, dns)
    _flag_flows(flags, flows)
    if files:
        _flag_files(flags, files.get("changes", []))
    names = _names(dns)
    destinations = _destinations(flows)
    suggestions, notes = _suggestions(flows, names)
    denials = _denials(flows, dns)
    shown = [f for f in flows if not _is_corral_dns(f)]
    times = [e["ts"] for e in evs if isinstance(e.get("ts"), (int, float))]
    started = start["ts"] if start else (min(times) if times else None)
    ended = end["ts"] if end else (max(times) if times else None)
    if exit_code is None and end is not None:
        exit_code = end.get("exit_code")
    flag_list = flags.sorted()

    return {
        "schema": SCHEMA,
        "generated": time.time() if generated is None else generated,
        "sandbox": {
            "id": (start or end or {}).get("sandbox_id"),
            "argv": list(start["argv"]) if start else None,
            "mode": start.get("mode") if start else None,
            "pid": start.get("pid") if start else None,
            "started": started,
            "ended": ended,
            "duration": (ended - started) if started is not None and ended is not None else None,
            "exit_code": exit_code,
            "signal": end.get("signal") if end else None,
        },
        "summary": {
            "dns_queries": len(dns),
            "dns_denied": sum(1 for e in dns if e["verdict"] != "allow"),
            "names_resolved": sum(1 for n in names if n["allowed"]),
            "connections": len(shown),
            "connections_denied": sum(1 for f in shown if f["verdict"] != "allow"),
            "destinations": len(destinations),
            "bytes_out": sum(f["bytes_out"] for f in shown),
            "bytes_in": sum(f["bytes_in"] for f in shown),
            "policy_errors": len(errors),
            "files_changed": len(files["changes"]) if files else 0,
            "flags": {sev: sum(1 for f in flag_list if f["severity"] == sev) for sev in ("high", "medium", "low")},
        },
        "denials": denials,
        "flags": flag_list,
        "destinations": destinations,
        "names": names,
        "dns": [
            {k: e.get(k) for k in ("ts", "qname", "qtype", "transport", "verdict", "rule", "reason", "rcode",
                                   "upstream")} | {"answers": list(e.get("answers") or ())}
            for e in dns
        ],
        "policy_errors": [{k: e.get(k) for k in ("ts", "callback", "subject", "error", "timed_out")} for e in errors],
        "files": files,
        "suggested_allowlist": {"rules": suggestions, "notes": notes},
    }


# -- renderings ------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_allowlist(report: dict) -> str:
    """The suggested allowlist as text ``load_allow_file`` accepts as is.

    One ``host:port/proto`` rule per resolved name and port the run contacted, an address
    rule only for flows no usable DNS name was looked up for. Names the client claimed
    (TLS SNI / HTTP Host) never become rules, nor does anything in the always-denied set:
    they are notes. Each rule ends with a comment saying why; what no rule can express is
    listed as comments.
    """
    box = report.get("sandbox") or {}
    argv = " ".join(_safe(a) for a in (box.get("argv") or ()))
    lines = [
        "# corral allowlist suggested by `corral audit`" + (f" of: {argv}" if argv else ""),
        "# Use it with: corral run --allow-file THIS_FILE -- ...",
        "# Review every line: it allows what the command did in that run, nothing more.",
    ]
    sugg = report.get("suggested_allowlist") or {}
    rules = sugg.get("rules") or []
    if not rules:
        lines.append("# (the command contacted nothing that needs a rule)")
    width = max((len(r["rule"]) for r in rules), default=0)
    for r in rules:
        stats = f"{r['connections']} conn, {_size(r['bytes_out'])} up / {_size(r['bytes_in'])} down"
        lines.append(f"{r['rule']:<{width}}  # {_safe(r['comment'])}; {stats}")
    for note in sugg.get("notes") or ():
        lines.append(f"# note: {_safe(note)}")
    return "\n".join(lines) + "\n"


def render_text(report: dict, *, max_rows: int = 20) -> str:
    """The human summary for stderr: denials first, flags, destinations by name, names, files."""
    s, box = report["summary"], report["sandbox"]
    argv = " ".join(_safe(a) for a in (box.get("argv") or ())) or "?"
    status = "?" if box.get("exit_code") is None else str(box["exit_code"])
    dur = f" after {box['duration']:.1f}s" if box.get("duration") is not None else ""
    out = [f"corral audit: `{argv}` exited {status}{dur}"]
    out.append(
        f"  {s['dns_queries']} DNS queries ({s['dns_denied']} denied), {s['connections']} connections "
        f"({s['connections_denied']} denied) to {s['destinations']} destinations, "
        f"{_size(s['bytes_out'])} up / {_size(s['bytes_in'])} down, {s['files_changed']} file changes"
    )

    def section(title: str, rows: list[str]) -> None:
        if not rows:
            return
        out.append("")
        out.append(title)
        out.extend(rows[:max_rows])
        if len(rows) > max_rows:
            out.append(f"  ... {len(rows) - max_rows} more (see --report)")

    rows = []
    for d in report["denials"]:
        name = f" ({_safe(d['name'])})" if d["name"] and d["kind"] == "connect" else ""
        rows.append(f"  x {_safe(d['subject'])}{name}  x{d['count']}  [{_safe(d['rule'])}] {_safe(d['reason'] or '')}")
    section("DENIED", rows)
    section("FLAGS", [
        f"  ! {f['severity']:<6} {f['kind']:<18} {_safe(f['subject'])}: {_safe(f['detail'])}"
        + (f" (x{f['count']})" if f["count"] > 1 else "")
        for f in report["flags"]
    ])
    rows = []
    for d in report["destinations"]:
        who = d["name"] or ", ".join(d["ips"])
        ports = ",".join(f"{e['port']}/{e['proto']}" if e["proto"] != "icmp" else "icmp" for e in d["endpoints"])
        verdict = f"{d['denied']} denied" if d["denied"] else "allowed"
        rows.append(f"  {_safe(who):<40} {ports:<14} {d['connections']:>4} conn  "
                    f"{_size(d['bytes_out']):>9} up {_size(d['bytes_in']):>9} down  {verdict}")
    section("DESTINATIONS", rows)
    section("NAMES RESOLVED", [
        f"  {_safe(n['name']):<40} {'/'.join(n['types']):<10} x{n['queries']:<3} "
        + (", ".join(_safe(a["value"]) for a in n["answers"][:4]) or "/".join(n["rcodes"]) or "-")
        + (f"  ({n['denied']} denied)" if n["denied"] else "")
        for n in report["names"]
    ])
    section("POLICY ERRORS", [
        f"  {e['callback']} on {_safe(e['subject'])}: {_safe(e['error'])}" + (" (timed out)" if e["timed_out"] else "")
        for e in report["policy_errors"]
    ])
    files = report.get("files")
    if files:
        rows = []
        for c in files["changes"]:
            extra = ""
            if c["kind"] == "file" and c["size"] is not None:
                extra = f" ({_size(c['size'])}{', executable' if c['executable'] else ''})"
            elif c["kind"] == "symlink":
                extra = f" -> {_safe(c['link_target'])}"
            rows.append(f"  {c['change']:<9} {_safe(c['path'])}{'/' if c['kind'] == 'dir' else ''}{extra}")
        if files.get("truncated"):
            rows.append("  (list truncated)")
        cut = f"; {files['omitted']} more changes not listed" if files.get("omitted") else ""
        section(f"FILES CHANGED (kept in the sandbox, not on the host{cut})", rows)
    return "\n".join(out) + "\n"
