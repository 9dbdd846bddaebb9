"""Name rules hold however the first bytes arrive (issue 10, point 1), in the world.

``--allow HTTP_V4 --deny evil.corral.test``: a ClientHello or an HTTP request naming the
denied host, written in pieces (split at byte 3, byte by byte, after a pause, with a
pause in the middle), must never reach the server.  Either corral reassembles the first
message and the deny rule matches its name, or the bound on reading it runs out and the
flow is denied as ``claim-incomplete`` — never allowed without its name.  The same
pieces naming an allowed host go through.
"""

import pytest

from net_support import http_requests_with, probe, token
from world import HELLO_BODY, HTTP_V4

pytestmark = pytest.mark.network

HELLO = HELLO_BODY.decode()
DENIED = "evil.corral.test"
ALLOWED = "tls.corral.test"
BOUND = 1.0  # corral.net.service.PEEK_TIMEOUT: the first message's bytes, first to last


def _tls(world, name, path, **pieces):
    return {"op": "tls", "host": HTTP_V4, "port": 443, "server_name": name, "path": path,
            "cafile": str(world.ca_cert), **pieces}


def _http(name, path, pieces, **kw):
    head = f"GET {path} HTTP/1.1\r\nUser-Agent: probe\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    cuts = [head.index(p) for p in pieces]
    parts = [head[a:b] for a, b in zip([0, *cuts], [*cuts, len(head)])]
    return {"op": "tcp", "host": HTTP_V4, "port": 80, "pieces": parts, **kw}


ATTACKS = {  # name -> (probe factory, how it must be denied)
    "tls_split_at_byte_3": (lambda w, p: _tls(w, DENIED, p, split=[3]), DENIED),
    "tls_across_five_writes": (lambda w, p: _tls(w, DENIED, p, split=[1, 5, 9, 60, 200]), DENIED),
    "tls_byte_by_byte": (lambda w, p: _tls(w, DENIED, p, bytewise=True), DENIED),
    "tls_after_a_half_second_pause": (lambda w, p: _tls(w, DENIED, p, pause_first=0.5), DENIED),
    "tls_split_with_a_half_second_pause": (lambda w, p: _tls(w, DENIED, p, split=[3], pause=0.5), DENIED),
    "tls_stalled_past_the_bound": (lambda w, p: _tls(w, DENIED, p, split=[3], pause=BOUND + 0.5),
                                   "claim-incomplete"),
    "http_host_line_split": (lambda w, p: _http(DENIED, p, ["st: evil"]), DENIED),
    "http_host_late": (lambda w, p: _http(DENIED, p, ["Host:"], pause=0.5), DENIED),
    "http_host_byte_split_and_late": (lambda w, p: _http(DENIED, p, ["Ho", "evil.", "\r\nConn"], pause=0.3),
                                      DENIED),
    "http_host_stalled_past_the_bound": (lambda w, p: _http(DENIED, p, ["Host:"], pause=BOUND + 0.5),
                                         "claim-incomplete"),
}

ALLOWED_CASES = {
    "tls_split_at_byte_3": lambda w, p: _tls(w, ALLOWED, p, split=[3]),
    "tls_byte_by_byte": lambda w, p: _tls(w, ALLOWED, p, bytewise=True),
    "tls_split_with_a_pause": lambda w, p: _tls(w, ALLOWED, p, split=[3], pause=0.3),
    "http_host_late": lambda w, p: _http("www.corral.test", p, ["Host:"], pause=0.3),
}


@pytest.fixture(scope="module")
def split_world(world, tmp_path_factory):
    tok = token()
    paths = {}
    probes = []
    for name in [*ATTACKS, *("ok-" + n for n in ALLOWED_CASES)]:
        paths[name] = f"/files/{name}-{tok}"
        (world.docroot / paths[name].rsplit("/", 1)[1]).write_text(HELLO)
    for name, (make, _) in ATTACKS.items():
        probes.append(make(world, paths[name]))
    for name, make in ALLOWED_CASES.items():
        probes.append(make(world, paths["ok-" + name]))
    out = probe(world, tmp_path_factory.mktemp("split"),
                ["--ro", str(world.ca_cert), "--allow", HTTP_V4, "--deny", DENIED], probes)
    results = dict(zip([*ATTACKS, *("ok-" + n for n in ALLOWED_CASES)], out.results))
    return out, paths, results


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_split_or_late_first_message_naming_a_denied_host_is_denied(world, split_world, attack):
    out, paths, results = split_world
    _, rule = ATTACKS[attack]
    r = results[attack]
    # nothing reached the server, and the client saw its connection reset
    assert http_requests_with(world, paths[attack]) == [], r
    assert HELLO not in (r.get("data") or ""), r
    if rule == DENIED:
        name_field = "sni" if attack.startswith("tls") else "http_host"
        denied = [e for e in out.connects(dst_ip=HTTP_V4, rule=DENIED, **{name_field: DENIED})]
        assert denied, out.dump()
        assert all(e["verdict"] == "deny" for e in denied)
    else:
        incomplete = out.connects(dst_ip=HTTP_V4, rule="claim-incomplete")
        assert incomplete and all(e["verdict"] == "deny" for e in incomplete), out.dump()
        assert "no complete first message" in incomplete[0]["reason"]
    # no flow to the allowed address went through without its name
    for ev in out.connects(dst_ip=HTTP_V4, verdict="allow"):
        assert ev["sni"] == ALLOWED or ev["http_host"] == "www.corral.test", ev


@pytest.mark.parametrize("case", list(ALLOWED_CASES))
def test_split_first_message_naming_an_allowed_host_still_works(world, split_world, case):
    out, paths, results = split_world
    r = results["ok-" + case]
    assert r["ok"] and HELLO in r["data"], r
    (seen,) = http_requests_with(world, paths["ok-" + case])
    if case.startswith("tls"):
        assert seen["sni"] == ALLOWED
        assert out.connects(dst_ip=HTTP_V4, sni=ALLOWED, verdict="allow")
    else:
        assert seen["host"] == "www.corral.test"
        (ev,) = out.connects(dst_ip=HTTP_V4, http_path=paths["ok-" + case])
        assert (ev["verdict"], ev["http_host"]) == ("allow", "www.corral.test"), ev
