"""Names for every TCP flow (issue 4, item 2): TLS SNI and HTTP Host read from the
client's first bytes, used by the rules and recorded in the events, through the CLI.

The decision of a flow the rules would allow waits for the client's first bytes (the
stack dials, completes the handshake, reads, and only then lets anything through), so
a deny rule on a name stops a connection to an allowed address before the world's
server sees a byte; ports where the server speaks first are not read ahead.
"""

import json
import subprocess
import sys

import pytest

from net_support import HERE as HERE_TESTS, PY, corral, curl, http_requests_with, probe, token
from world import ECHO_V4, HELLO_BODY, HTTP_V4, PORT_CLOSE_AFTER_WRITE

pytestmark = pytest.mark.network

HELLO = HELLO_BODY.decode()
PEEK_TIMEOUT = 0.3  # the observe wait before: kept as the bound of "no noticeable wait"
SERVER_FIRST_PORT = 3306  # MySQL: in corral.net.service.SERVER_FIRST_PORTS
GREETING = "server speaks first\n"


@pytest.fixture(scope="module")
def greeter(world):
    """A server-speaks-first TCP server on ECHO_V4:3306 (greets, then closes)."""
    code = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({ECHO_V4!r}, {SERVER_FIRST_PORT}))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall({GREETING.encode()!r})
    c.close()
"""
    proc = world.popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    yield
    proc.kill()


@pytest.fixture(scope="module")
def by_address(world, greeter, tmp_path_factory):
    """`--allow` on addresses, `--deny` on a name only the client's first bytes carry."""
    tok = token()
    paths = {k: f"/files/{k}-{tok}" for k in ("tls", "http", "evil", "evilhttp")}
    for p in paths.values():
        (world.docroot / p.rsplit("/", 1)[1]).write_text(HELLO)
    cacert = str(world.ca_cert)
    out = probe(world, tmp_path_factory.mktemp("names"), [
        "--ro", cacert, "--allow", HTTP_V4, "--allow", ECHO_V4,
        "--deny", "evil.corral.test",
    ], [
        curl("--cacert", cacert, "--resolve", f"tls.corral.test:443:{HTTP_V4}",
             f"https://tls.corral.test{paths['tls']}"),                              # 0
        curl("--resolve", f"www.corral.test:80:{HTTP_V4}", f"http://www.corral.test{paths['http']}"),  # 1
        curl("--cacert", cacert, "--resolve", f"evil.corral.test:443:{HTTP_V4}",
             f"https://evil.corral.test{paths['evil']}"),                            # 2
        curl("-H", "Host: evil.corral.test", f"http://{HTTP_V4}{paths['evilhttp']}"),  # 3
        {"op": "tcp", "host": ECHO_V4, "port": SERVER_FIRST_PORT},                    # 4
        {"op": "tcp", "host": ECHO_V4, "port": PORT_CLOSE_AFTER_WRITE},               # 5
    ])
    return out, paths


def test_tls_sni_names_the_flow(by_address):
    out, _ = by_address
    r = out.results[0]
    assert (r["rc"], r["out"]) == (0, HELLO), r
    ev = out.connect(dst_ip=HTTP_V4, dst_port=443, sni="tls.corral.test")
    assert (ev["verdict"], ev["rule"], ev["name"]) == ("allow", HTTP_V4, "tls.corral.test")
    assert ev["http_host"] is None and ev["http_method"] is None
    (close,) = out.closes_of(ev["id"])
    # the whole TLS exchange went through (the ClientHello the stack read included)
    assert close["bytes_in"] > len(HELLO) and close["bytes_out"] > 0, close


def test_http_host_method_and_path_are_recorded(world, by_address):
    out, paths = by_address
    r = out.results[1]
    assert (r["rc"], r["out"]) == (0, HELLO), r
    ev = out.connect(dst_ip=HTTP_V4, dst_port=80, http_path=paths["http"])
    assert (ev["http_host"], ev["http_method"], ev["sni"]) == ("www.corral.test", "GET", None)
    assert ev["verdict"] == "allow" and ev["name"] == "www.corral.test"
    # the peeked request reached the server intact
    (seen,) = http_requests_with(world, paths["http"])
    assert seen["host"] == "www.corral.test"


def test_sni_of_a_denied_host_on_an_allowed_address_is_reset(world, by_address):
    out, paths = by_address
    r = out.results[2]
    # curl 35: the TLS handshake failed, here because the connection was reset
    assert r["rc"] == 35 and "reset" in r["err"].lower(), r
    ev = out.connect(dst_ip=HTTP_V4, dst_port=443, sni="evil.corral.test")
    assert (ev["verdict"], ev["rule"]) == ("deny", "evil.corral.test"), ev
    assert "deny rule evil.corral.test" in ev["reason"]
    (close,) = out.closes_of(ev["id"])
    assert close["reason"] == "denied" and close["bytes_out"] == 0 and close["bytes_in"] == 0, close
    assert http_requests_with(world, paths["evil"]) == []


def test_host_header_of_a_denied_host_is_reset(world, by_address):
    out, paths = by_address
    r = out.results[3]
    assert r["rc"] == 56 and "reset" in r["err"].lower(), r  # curl 56: failure receiving
    ev = out.connect(dst_ip=HTTP_V4, dst_port=80, http_host="evil.corral.test")
    assert (ev["verdict"], ev["rule"], ev["http_path"]) == ("deny", "evil.corral.test", paths["evilhttp"])
    assert http_requests_with(world, paths["evilhttp"]) == []


def test_server_first_port_is_not_held_for_the_peek(by_address):
    out, _ = by_address
    fast, peeked = out.results[4], out.results[5]
    assert fast["ok"] and fast["data"] == GREETING, fast
    assert fast["elapsed"] < PEEK_TIMEOUT * 0.8, fast
    ev = out.connect(dst_ip=ECHO_V4, dst_port=SERVER_FIRST_PORT)
    assert ev["verdict"] == "allow" and ev["sni"] is None and ev["http_host"] is None
    # a port corral does not know as server-first is held for the client's first
    # message, but the server's bytes reach the client meanwhile: no wait either
    assert peeked["ok"] and peeked["data"], peeked
    assert peeked["elapsed"] < PEEK_TIMEOUT * 0.8, peeked
    ev = out.connect(dst_ip=ECHO_V4, dst_port=PORT_CLOSE_AFTER_WRITE)
    assert (ev["verdict"], ev["rule"], ev["sni"]) == ("allow", ECHO_V4, None), ev


@pytest.fixture(scope="module")
def observed(world, tmp_path_factory):
    """Address rules only: no claimed name can deny, so flows are observed, not held."""
    tok = token()
    path = f"/files/observed-{tok}"
    (world.docroot / path.rsplit("/", 1)[1]).write_text(HELLO)
    out = probe(world, tmp_path_factory.mktemp("observed"), ["--allow", HTTP_V4, "--allow", ECHO_V4], [
        curl("--resolve", f"www.corral.test:80:{HTTP_V4}", f"http://www.corral.test{path}"),  # 0
        {"op": "tcp", "host": ECHO_V4, "port": PORT_CLOSE_AFTER_WRITE},                    # 1
    ])
    return out, path


def test_observed_flow_is_named_without_waiting(world, observed):
    out, path = observed
    r = out.results[0]
    assert (r["rc"], r["out"]) == (0, HELLO), r
    ev = out.connect(dst_ip=HTTP_V4, dst_port=80, http_path=path)
    assert (ev["verdict"], ev["rule"], ev["http_host"], ev["http_method"]) == (
        "allow", HTTP_V4, "www.corral.test", "GET"), ev
    (seen,) = http_requests_with(world, path)
    assert seen["host"] == "www.corral.test"


def test_observed_server_first_flow_is_not_held(observed):
    """Unlike the by_address case (a deny rule on a name), nothing here waits the peek out."""
    out, _ = observed
    r = out.results[1]
    assert r["ok"] and r["data"], r
    assert r["elapsed"] < PEEK_TIMEOUT * 0.8, r
    ev = out.connect(dst_ip=ECHO_V4, dst_port=PORT_CLOSE_AFTER_WRITE)
    assert ev["verdict"] == "allow" and ev["sni"] is None and ev["http_host"] is None
    (close,) = out.closes_of(ev["id"])
    assert close["bytes_in"] > 0, close


def test_claimed_name_outside_a_domain_allowlist_is_denied(world, tmp_path):
    tok = token()
    path = f"/files/fronted-{tok}"
    (world.docroot / path.rsplit("/", 1)[1]).write_text(HELLO)
    cacert = str(world.ca_cert)
    out = probe(world, tmp_path, ["--ro", cacert, "--allow", "www.corral.test"], [
        # DNS for www.corral.test (allowed), then a ClientHello naming tls.corral.test
        curl("--cacert", cacert, "--connect-to", "tls.corral.test:443:www.corral.test:443",
             f"https://tls.corral.test{path}"),                                     # 0
        curl("--cacert", cacert, f"https://www.corral.test{path}"),                 # 1 control
    ])
    fronted, plain = out.results
    assert fronted["rc"] == 35 and "reset" in fronted["err"].lower(), fronted
    ev = out.connect(dst_port=443, sni="tls.corral.test")
    assert (ev["verdict"], ev["rule"], ev["names"]) == ("deny", "claimed-name-not-allowed",
                                                         ["www.corral.test"]), ev
    assert (plain["rc"], plain["out"]) == (0, HELLO), plain
    ev = out.connect(dst_port=443, sni="www.corral.test")
    assert (ev["verdict"], ev["rule"]) == ("allow", "www.corral.test")
    (seen,) = http_requests_with(world, path)
    assert seen["sni"] == "www.corral.test"


def test_audit_flags_a_second_stage_download(world, tmp_path):
    name = f"stage2-{token()}.sh"
    (world.docroot / name).write_text("#!/bin/sh\necho second stage\n")
    report = tmp_path / "report.json"
    result = world.run([sys.executable, "-m", "corral", "audit", "--report", str(report), "--",
                        "curl", "-sS", "-m", "5", f"http://{HTTP_V4}/files/{name}"],
                       capture_output=True, text=True, timeout=60, cwd=str(HERE_TESTS))
    assert result.returncode == 0 and "second stage" in result.stdout, result.stderr
    flags = json.loads(report.read_text())["flags"]
    hits = [f for f in flags if f["kind"] == "second-stage"]
    assert hits and any(f"/files/{name}" in json.dumps(f) for f in hits), flags
    assert "second-stage" in result.stderr


def test_deny_without_a_name_rule_is_not_peeked(world, tmp_path):
    """A flow the rules deny is reset at once: no read-ahead, no wait."""
    out = corral(world, tmp_path, [], [PY, "-c", (
        "import socket, time; t = time.monotonic(); s = socket.socket()\n"
        "try: s.connect(('%s', 80))\n"
        "except ConnectionRefusedError: print(time.monotonic() - t)\n") % HTTP_V4])
    assert out.proc.returncode == 0 and out.proc.stdout.strip(), out.dump()
    assert float(out.proc.stdout) < 0.2, out.dump()
    assert out.connect(dst_ip=HTTP_V4, dst_port=80)["rule"] == "default-deny"
