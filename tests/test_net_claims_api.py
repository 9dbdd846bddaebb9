"""Callbacks that decide with names (issue 10, point 1), through the Python API in the world.

``on_claim(req)`` sees ``req.sni`` / ``req.http_host`` once the first message is read
(however it was split); ``on_connect`` with no ``on_dns`` gets its DNS resolved, so the
README's example reaches its callback with the name.
"""

import pytest

from net_support import HERE, probe
from test_net_api import connect_events, drive
from world import HELLO_BODY, HTTP_V4, OTHER_V4

pytestmark = pytest.mark.network


def test_on_claim_callback_denies_by_sni_however_the_hello_is_split(world):
    cacert = str(world.ca_cert)
    out = drive(world, f"""
        asked = []
        async def on_claim(req):
            asked.append([req.sni, req.http_host])
            if "evil" in (req.sni or req.http_host or ""):
                return corral.deny("no evil hosts")
            return corral.ALLOW

        def tls(name, **kw):
            return {{"op": "tls", "host": "{HTTP_V4}", "port": 443, "server_name": name,
                    "cafile": {cacert!r}, **kw}}

        result = corral.run(probes(
            tls("tls.corral.test", split=[3]),
            tls("evil.corral.test", split=[3]),
            tls("evil.corral.test", bytewise=True),
            {{"op": "tcp", "host": "{HTTP_V4}", "port": 80,
              "pieces": ["GET / HTTP/1.1\\r\\nHo", "st: evil.corral.test\\r\\n\\r\\n"], "pause": 0.2}},
        ), ro=[{cacert!r}], on_claim=on_claim, capture_output=True)
        report(result, asked=asked)
    """)
    ok, evil_split, evil_bytes, evil_http = out["results"]
    assert ok["ok"] and HELLO_BODY.decode() in ok["data"], ok
    for r in (evil_split, evil_bytes, evil_http):
        assert not r["ok"] or HELLO_BODY.decode() not in r["data"], r
    assert sorted(map(str, out["asked"])) == sorted(map(str, [
        [None, "evil.corral.test"], ["evil.corral.test", None], ["evil.corral.test", None],
        ["tls.corral.test", None]]))
    denied = connect_events(out, verdict="deny", rule="callback", reason="no evil hosts")
    assert len(denied) == 3 and {e["sni"] or e["http_host"] for e in denied} == {"evil.corral.test"}
    (allowed,) = connect_events(out, verdict="allow", rule="callback")
    assert allowed["sni"] == "tls.corral.test"


def test_readme_on_connect_example_reaches_its_callback_with_the_name(world):
    """README: allow=["pypi.org"] plus on_connect allowing *.pythonhosted.org.  Before,
    DNS for files.pythonhosted.org was REFUSED and the callback never ran."""
    out = drive(world, """
        async def on_connect(req: corral.ConnectRequest) -> corral.Verdict:
            if req.name and req.name.endswith(".pythonhosted.org"):
                return corral.ALLOW
            return corral.deny("not a package host")

        result = corral.run(probes(
            {"op": "sh", "argv": ["curl", "-sS", "-m", "5", "http://files.pythonhosted.org/"]},
            {"op": "sh", "argv": ["curl", "-sS", "-m", "5", "http://example.com/"]},
        ), allow=["pypi.org"], on_connect=on_connect, capture_output=True)
        report(result)
    """)
    hosted, other = out["results"]
    assert hosted["rc"] == 0 and HELLO_BODY.decode() in hosted["out"], hosted
    assert other["rc"] == 7, other  # resolved, then refused by the callback
    dns = {e["qname"]: e for e in out["events"] if e["type"] == "dns" and e["qtype"] == "A"}
    assert dns["files.pythonhosted.org"]["rule"] == "resolve-for-callback"
    assert dns["files.pythonhosted.org"]["verdict"] == "allow"
    (ev,) = connect_events(out, dst_ip=OTHER_V4[2], dst_port=80)
    assert (ev["verdict"], ev["rule"], ev["name"]) == ("allow", "callback", "files.pythonhosted.org")
    (ev,) = connect_events(out, dst_ip=OTHER_V4[0], dst_port=80)
    assert (ev["verdict"], ev["rule"], ev["reason"], ev["name"]) == (
        "deny", "callback", "not a package host", "example.com")


def test_policy_md_on_claim_example_runs_verbatim(world, tmp_path):
    """The on_claim example of docs/policy.md, loaded with --policy, decides by Host."""
    text = (HERE.parent / "docs" / "policy.md").read_text()
    block = next(b for b in text.split("```python\n")[1:] if "async def on_claim" in b).split("```")[0]
    policy = tmp_path / "policy.py"
    policy.write_text("import corral\n\n" + block)
    out = probe(world, tmp_path, ["--policy", str(policy)], [
        {"op": "sh", "argv": ["curl", "-sS", "-m", "5", "http://files.pythonhosted.org/"]},
        {"op": "sh", "argv": ["curl", "-sS", "-m", "5", "http://example.com/"]},
    ])
    hosted, other = out.results
    assert hosted["rc"] == 0 and HELLO_BODY.decode() in hosted["out"], hosted
    assert other["rc"] == 56 and "reset" in other["err"].lower(), other
    ev = out.connect(http_host="example.com")
    assert (ev["verdict"], ev["rule"], ev["reason"]) == ("deny", "callback", "example.com is not a package host")
    assert out.connect(http_host="files.pythonhosted.org")["verdict"] == "allow"
