"""`corral audit` end to end (issue 4): a scripted installer whose behaviour is
known (examples/installer.py) runs in the test world; every report section
shows what it did, the JSON validates against the schema, and the suggested
allowlist, fed back to `corral run`, lets the same tool do exactly the same
network things and nothing else."""

import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest

from corral.events.report import load_schema

pytestmark = [pytest.mark.namespaces, pytest.mark.network]

INSTALLER = Path(__file__).resolve().parent.parent / "examples" / "installer.py"


@pytest.fixture(scope="module")
def audited(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    world.add_record("webhook.site", "A", "203.0.113.2")
    (world.docroot / "stage2.sh").write_text("#!/bin/sh\necho pwned\n")
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("fake key\n")
    (home / ".bashrc").write_text("# rc\n")
    project = home / "project"
    project.mkdir()
    # USER fixed: what the installer exfiltrates must not depend on who runs the tests.
    env = dict(os.environ, HOME=str(home), USER="builder", GITHUB_TOKEN="ghp_fake")
    report, suggest = tmp / "report.json", tmp / "allow.txt"
    result = world.run([sys.executable, "-m", "corral", "audit", "--report", str(report),
                        "--suggest", str(suggest), "--", sys.executable, str(INSTALLER)],
                       env=env, cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {"report": json.loads(report.read_text()), "suggest": suggest, "stderr": result.stderr,
            "stdout": result.stdout, "env": env, "project": project, "home": home}


def test_report_validates_against_its_schema(audited):
    jsonschema.validate(audited["report"], load_schema())
    assert audited["report"]["schema"] == "corral.audit/2"


def test_report_lists_names_destinations_denials_and_files(audited):
    report = audited["report"]
    names = {n["name"] for n in report["names"]}
    assert {"pypi.org", "webhook.site"} <= names
    assert any(n.endswith(".exfil.corral.test") for n in names)
    destinations = {d["name"] or d["ips"][0]: d for d in report["destinations"]}
    assert destinations["pypi.org"]["allowed"] == 1 and destinations["pypi.org"]["bytes_in"] > 0
    assert destinations["203.0.113.1"]["allowed"] == 1
    assert destinations["169.254.169.254"]["denied"] == 1
    assert report["denials"][0]["rule"] == "always-denied:metadata"  # denials come first
    changes = {c["path"]: c["change"] for c in report["files"]["changes"]}
    assert changes[str(audited["home"] / ".bashrc")] == "modified"
    assert changes["/etc/profile.d/left-pad.sh"] == "created"


def test_report_flags_suspicious_behaviour(audited):
    kinds = {f["kind"] for f in audited["report"]["flags"]}
    assert {"always-denied", "persistence", "dns-exfil", "raw-ip", "watched-service"} <= kinds


def test_human_summary_on_stderr_puts_denials_first(audited):
    text = audited["stderr"]
    assert "corral audit:" in text
    assert text.index("DENIED") < text.index("DESTINATIONS")
    assert "169.254.169.254" in text


def test_suggested_allowlist_lets_the_tool_do_the_same_and_nothing_else(world, audited):
    result = world.run([sys.executable, "-m", "corral", "run", "--allow-file", str(audited["suggest"]),
                        "--events", "-", "--", sys.executable, str(INSTALLER)],
                       env=audited["env"], cwd=audited["project"], capture_output=True, text=True,
                       timeout=120)
    assert result.returncode == 0, result.stderr
    done = {line.split(None, 1)[1].rsplit("  ", 1)[0].strip()
            for line in result.stdout.splitlines() if line.strip().startswith("DONE")}
    network_done_in_audit = {"fetch the package index from pypi.org", "post the loot to webhook.site",
                             "download a second stage from 203.0.113.1"}
    assert network_done_in_audit <= done
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    denied = {(e["dst_ip"], e["dst_port"]) for e in events if e["type"] == "connect" and e["verdict"] == "deny"}
    assert ("169.254.169.254", 80) in denied
    allowed = {(e["dst_ip"], e["dst_port"]) for e in events if e["type"] == "connect" and e["verdict"] == "allow"}
    assert allowed == {("203.0.113.3", 80), ("203.0.113.2", 80), ("203.0.113.1", 80)}


def test_suggested_allowlist_denies_other_destinations(world, audited):
    result = world.run([sys.executable, "-m", "corral", "run", "--allow-file", str(audited["suggest"]),
                        "--", "curl", "-sS", "-m", "5", "-o", "/dev/null", "http://203.0.113.1:8080/"],
                       capture_output=True, text=True, timeout=60, cwd=audited["project"])
    assert result.returncode == 7  # curl: could not connect (refused by policy)
