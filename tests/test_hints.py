"""A blocked request must not look like a network failure (issue 12.4): `corral run`
says, once per destination, what it denied and how to allow it."""

import pytest

from corral.events import ConnectEvent, DnsEvent
from corral.events.hints import LIVE_LIMIT, DenialHints

pytestmark = []


def _dns(name, verdict="deny", rule="default-deny"):
    return DnsEvent(query_id=1, qname=name, qtype="A", transport="udp", verdict=verdict, rule=rule)


def _conn(ip, port, *, name=None, proto="tcp", verdict="deny", rule="default-deny"):
    return ConnectEvent(id=1, proto=proto, src_ip="10.0.2.100", src_port=4000, dst_ip=ip,
                        dst_port=port, name=name, verdict=verdict, rule=rule)


def test_a_denied_name_says_how_to_allow_it_once():
    lines = []
    hints = DenialHints(lines.append)
    hints.write(_dns("example.com."))
    hints.write(_dns("example.com."))
    hints.write(_dns("ok.test.", verdict="allow", rule="ok.test"))
    hints.close()
    assert lines == ["denied DNS example.com (no rule allows it) — allow with --allow example.com"]


def test_denied_connections_name_the_rule_to_add():
    lines = []
    hints = DenialHints(lines.append)
    hints.write(_conn("203.0.113.7", 443))
    hints.write(_conn("2001:db8::1", 53, proto="udp"))
    hints.write(_conn("198.51.100.10", 443, name="www.corral.test"))
    hints.write(_conn("169.254.169.254", 80, rule="always-denied:metadata"))
    assert lines[0].endswith("--allow 203.0.113.7:443")
    assert lines[1].endswith("--allow [2001:db8::1]:53/udp")
    assert lines[2].endswith("--allow www.corral.test:443")
    assert "always denied: metadata" in lines[3] and "--allow" not in lines[3]


def test_a_scanner_inside_cannot_flood_the_terminal():
    lines = []
    hints = DenialHints(lines.append)
    for i in range(200):
        hints.write(_conn("203.0.113.%d" % (i % 250), 80 + i))
    assert len(lines) == LIVE_LIMIT
    hints.close()
    assert len(lines) == LIVE_LIMIT + 1
    assert "200 destination(s) denied" in lines[-1] and "195 not shown" in lines[-1]


def test_a_flood_of_new_names_costs_bounded_memory():
    from corral.events.hints import TRACKED

    lines = []
    hints = DenialHints(lines.append)
    for i in range(TRACKED + 500):
        hints.write(_dns("r%d.corral.test." % i))
    assert len(hints._seen) == TRACKED
    hints.close()
    assert "500 more denials" in lines[-1]


def test_hint_escapes_terminal_control_bytes_from_the_sandbox():
    lines = []
    DenialHints(lines.append).write(_dns("evil\x1b]0;pwned\x07.test."))
    assert "\x1b" not in lines[0] and "\x07" not in lines[0]


@pytest.mark.namespaces
@pytest.mark.network
def test_corral_run_prints_the_hint_and_quiet_silences_it(world):
    import sys

    base = [sys.executable, "-m", "corral", "run", "--"]
    probe = [sys.executable, "-c", "import socket\ntry: socket.getaddrinfo('www.corral.test', 80)\n"
             "except OSError as e: print('resolve failed', e)"]
    loud = world.run(base[:4] + ["--"] + probe, capture_output=True, text=True, timeout=60)
    assert "resolve failed" in loud.stdout
    assert "corral: denied DNS www.corral.test (no rule allows it) — allow with --allow " \
        "www.corral.test" in loud.stderr
    quiet = world.run(base[:4] + ["--quiet", "--"] + probe, capture_output=True, text=True,
                      timeout=60)
    assert "resolve failed" in quiet.stdout and "denied" not in quiet.stderr


@pytest.mark.namespaces
@pytest.mark.network
def test_api_users_get_the_hint_through_on_warning(world):
    """corral.run(..., on_warning=...) receives the same line the CLI prints."""
    import sys

    code = ("import corral, socket\nlines = []\n"
            "r = corral.run(['python3', '-c', 'import socket\\ntry: socket.getaddrinfo(\"www.corral.test\", 80)\\n"
            "except OSError: pass'], on_warning=lines.append)\n"
            "print(r.exit_code); print(*lines, sep='\\n')")
    out = world.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "denied DNS www.corral.test (no rule allows it) — allow with --allow www.corral.test" \
        in out.stdout, out.stdout + out.stderr
