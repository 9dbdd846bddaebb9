"""What a run did that an earlier run did not: ``corral diff OLD.json NEW.json`` (sans-io).

Compares two audit reports (``corral.audit/1`` or ``/2``, docs/report.md) and lists
what is new in NEW: destinations (names and addresses), endpoints (destination, port,
transport), processes that used the network (by their ancestry, as pids differ between
runs), flags (kind and subject) and file changes (path and change).  Nothing here does
I/O except :func:`load_report` (reads one file).
"""

from __future__ import annotations

import json
from typing import Any

from corral.errors import ConfigError

__all__ = ["CATEGORIES", "SCHEMA", "diff_reports", "load_report", "render_diff"]

SCHEMA = "corral.diff/1"
CATEGORIES = ("destinations", "endpoints", "processes", "flags", "files")
TITLES = {
    "destinations": "NEW DESTINATIONS",
    "endpoints": "NEW PORTS AND PROTOCOLS",
    "processes": "NEW PROCESSES USING THE NETWORK",
    "flags": "NEW FLAGS",
    "files": "NEW FILE CHANGES",
}
MAX_BYTES = 256 * 1024 * 1024  # a report larger than this is not one corral wrote


def load_report(path: str) -> dict:
    """A report from a file; ConfigError (one line: what and the fix) when it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read report {path!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path!r} is larger than {MAX_BYTES // 2**20} MiB: not an audit report")
    try:
        report = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path!r} is not JSON ({str(exc)[:80]}). Fix: pass the file "
                          "`corral audit --report FILE` wrote") from None
    schema = report.get("schema") if isinstance(report, dict) else None
    if not isinstance(schema, str) or schema not in ("corral.audit/1", "corral.audit/2"):
        raise ConfigError(f"{path!r} is not a corral audit report (schema {schema!r}). Fix: pass the "
                          "file `corral audit --report FILE` wrote")
    try:
        _keys(report)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path!r}: a malformed audit report ({type(exc).__name__}: {exc})") from None
    return report


def _list(report: dict, key: str) -> list:
    value = report.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"{key} is not a list")
    return value


def _keys(report: dict) -> dict[str, dict[tuple, dict]]:
    """Each category's items by identity -> a JSON-able description."""
    out: dict[str, dict[tuple, dict]] = {c: {} for c in CATEGORIES}
    for d in _list(report, "destinations"):
        where = d["name"] or (d["ips"][0] if d["ips"] else None)
        if d["name"]:
            out["destinations"][("name", d["name"])] = {"name": d["name"], "ips": list(d["ips"])}
        for ip in d["ips"]:
            out["destinations"][("ip", ip)] = {"ip": ip, "name": d["name"]}
        for e in d["endpoints"]:
            out["endpoints"][(where, e["proto"], e["port"])] = {
                "destination": where, "proto": e["proto"], "port": e["port"]}
    for p in _list(report, "processes"):
        if p["pid"] is None:
            continue
        ancestry = tuple(p["ancestry"])
        out["processes"][ancestry] = {"program": p["program"], "ancestry": list(ancestry), "exe": p["exe"],
                                      "destinations": list(p["destinations"])}
    for f in _list(report, "flags"):
        out["flags"][(f["kind"], f["subject"])] = {k: f[k] for k in ("kind", "severity", "subject", "detail")}
    files = report.get("files") or {}
    if not isinstance(files, dict):
        raise TypeError("files is not an object")
    for c in _list(files, "changes"):
        out["files"][(c["path"], c["change"])] = {"path": c["path"], "change": c["change"], "kind": c["kind"]}
    return out


def diff_reports(old: dict, new: dict) -> dict:
    """``{schema, old, new, count, added: {category: [item, ...]}}``: what NEW has and OLD not."""
    before, after = _keys(old), _keys(new)
    added = {c: [after[c][k] for k in after[c] if k not in before[c]] for c in CATEGORIES}
    argv = lambda r: (r.get("sandbox") or {}).get("argv")  # noqa: E731
    return {"schema": SCHEMA, "old": argv(old), "new": argv(new),
            "count": sum(len(v) for v in added.values()), "added": added}


def _safe(text: Any) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _line(category: str, item: dict) -> str:
    if category == "destinations":
        if "ip" in item:
            return item["ip"] + (f" ({_safe(item['name'])})" if item["name"] else "")
        return _safe(item["name"]) + (f" -> {', '.join(item['ips'])}" if item["ips"] else "")
    if category == "endpoints":
        port = "icmp" if item["proto"] == "icmp" else f"{item['port']}/{item['proto']}"
        return f"{_safe(item['destination'])} {port}"
    if category == "processes":
        dests = ", ".join(_safe(d) for d in item["destinations"][:6])
        return _safe(item["program"]) + (f" -> {dests}" if dests else "")
    if category == "flags":
        return f"{item['severity']:<6} {item['kind']:<18} {_safe(item['subject'])}: {_safe(item['detail'])}"
    return f"{item['change']:<9} {_safe(item['path'])}"


def render_diff(diff: dict) -> str:
    """The human form: one section per category with something new."""
    if not diff["count"]:
        return "corral diff: nothing new\n"
    out = [f"corral diff: {diff['count']} new"]
    for category in CATEGORIES:
        items = diff["added"][category]
        if items:
            out.append("")
            out.append(TITLES[category])
            out.extend("  + " + _line(category, item) for item in items)
    return "\n".join(out) + "\n"
