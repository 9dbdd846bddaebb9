"""Verdicts and callbacks are validated up front (issue 10, point 3).

``Verdict(allowed="no")`` used to ALLOW; a sync, non-callable or wrongly-returning
callback silently denied every flow. Now: a bad Verdict is a TypeError, a callback of the
wrong kind is refused before anything starts, and a non-Verdict return is a
``policy_error`` event (subject: the flow id / the qname) plus one line on stderr.
"""

import functools
import json
import subprocess
import sys
import textwrap

import pytest

import corral
from corral.errors import CallbackTypeError, ConfigError
from corral.policy import check_callbacks, from_callback

from net_support import PROBE, PY, probe, token
from world import OTHER_V4


@pytest.mark.parametrize("value", ["no", "yes", "", 0, 1, None, [], "False"])
def test_verdict_with_a_non_bool_allowed_is_a_type_error(value):
    with pytest.raises(TypeError, match="must be True or False"):
        corral.Verdict(allowed=value)


def test_verdict_reason_must_be_text():
    with pytest.raises(TypeError, match="reason"):
        corral.Verdict(allowed=False, reason=42)
    assert corral.deny("why").reason == "why" and corral.ALLOW.allowed is True


@pytest.mark.parametrize("returned", [None, True, False, "allow", 1, corral.Verdict])
def test_callback_returning_a_non_verdict_is_a_callback_error(returned):
    d = from_callback(returned)
    assert not d.allowed and d.rule == "callback-error" and "not a corral.Verdict" in d.verdict.reason


async def _async_cb(req):
    return corral.ALLOW


def _sync_cb(req):
    return corral.ALLOW


class _AsyncCallable:
    async def __call__(self, req):
        return corral.ALLOW


class _SyncCallable:
    def __call__(self, req):
        return corral.ALLOW


@pytest.mark.parametrize("func", [_async_cb, functools.partial(_async_cb), _AsyncCallable()])
def test_async_callbacks_are_accepted(func):
    check_callbacks(on_connect=func, on_dns=func, on_claim=func, on_packet=lambda pkt: True)


@pytest.mark.parametrize(("name", "func", "words"), [
    ("on_connect", _sync_cb, "must be an async function"),
    ("on_connect", lambda req: corral.ALLOW, "async def on_connect"),
    ("on_dns", _SyncCallable(), "async def on_dns"),
    ("on_connect", _AsyncCallable, "must be an async function"),  # the class, not an instance
    ("on_connect", "allow", "got str"),
    ("on_dns", corral.ALLOW, "got Verdict"),
    ("on_packet", _async_cb, "not async def"),
    ("on_packet", 42, "got int"),
    ("on_claim", _sync_cb, "async def on_claim"),
    ("on_claim", "deny", "got str"),
])
def test_callback_of_the_wrong_kind_is_refused(name, func, words):
    with pytest.raises(CallbackTypeError, match=words) as info:
        check_callbacks(**{name: func})
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)


def test_run_refuses_a_sync_callback_before_anything_starts(monkeypatch):
    from corral import launch

    def boom(*a, **k):
        raise AssertionError("a sandbox was started")

    monkeypatch.setattr(launch, "prepare", boom)
    monkeypatch.setattr(launch, "run_blocking", boom)
    with pytest.raises(CallbackTypeError, match="on_connect"):
        corral.run(["true"], on_connect=_sync_cb)
    with pytest.raises(CallbackTypeError, match="on_dns"):
        corral.run(["true"], on_dns="not callable", net="none")


async def test_open_sandbox_refuses_a_sync_callback_before_anything_starts():
    with pytest.raises(CallbackTypeError, match="on_connect"):
        async with corral.open_sandbox(on_connect=_sync_cb):
            raise AssertionError("the body ran")


@pytest.mark.parametrize("source", [
    "def on_connect(req):\n    return corral.ALLOW\n",
    "on_dns = 'allow'\n",
    "async def on_packet(pkt):\n    return True\n",
])
def test_policy_file_with_a_wrong_callback_is_exit_2_before_running(tmp_path, source):
    policy = tmp_path / "policy.py"
    policy.write_text("import corral\n" + source)
    marker = tmp_path / "ran"
    result = subprocess.run([sys.executable, "-m", "corral", "run", "--policy", str(policy), "--",
                             "touch", str(marker)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--policy" in lines[0] and "Fix:" in lines[0], result.stderr


# -- in the world: non-Verdict returns are policy_error events and one stderr line ----------

POLICY = f'''
import corral

async def on_connect(req):
    return None if str(req.dst_ip) == "{OTHER_V4[0]}" else True

async def on_dns(query):
    return "allow"
'''


@pytest.mark.network
def test_callback_returning_none_or_true_is_a_policy_error_event_and_one_stderr_line(world, tmp_path):
    policy = tmp_path / "policy.py"
    policy.write_text(POLICY)
    tok = token()
    out = probe(world, tmp_path, ["--policy", str(policy)], [
        {"op": "tcp", "host": OTHER_V4[0], "port": 80},
        {"op": "tcp", "host": OTHER_V4[1], "port": 80},
        {"op": "tcp", "host": OTHER_V4[1], "port": 81},
        {"op": "sh", "argv": ["dig", "+time=2", "+tries=1", f"q-{tok}.corral.test"]},
    ])
    r = out.results
    assert all(x.get("errno") == 111 for x in r[:3]), r  # denied: refused
    assert "status: REFUSED" in r[3]["out"], r[3]
    errors = out.of_type("policy_error")
    conns = {e["id"]: e for e in out.of_type("connect")}
    on_connect = [e for e in errors if e["callback"] == "on_connect"]
    assert len(on_connect) == 3, out.dump()
    for e in on_connect:
        assert conns[int(e["subject"])]["rule"] == "callback-error"  # the subject is the flow id
    assert any("NoneType" in e["error"] for e in on_connect) and any("bool" in e["error"] for e in on_connect)
    (dns_error,) = [e for e in errors if e["callback"] == "on_dns" and e["subject"].startswith("q-")]
    assert dns_error["subject"] == f"q-{tok}.corral.test" and "str" in dns_error["error"]
    said = [line for line in out.proc.stderr.splitlines() if "policy callback" in line]
    assert len(said) == 1 and said[0].startswith("corral: policy callback"), out.proc.stderr


@pytest.mark.network
def test_api_callback_returning_none_warns_once_through_the_log(world):
    code = textwrap.dedent(f"""
        import json, logging, corral
        logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
        async def on_connect(req):
            return None
        result = corral.run([{PY!r}, {PROBE!r}, json.dumps([
            {{"op": "tcp", "host": "{OTHER_V4[0]}", "port": 80}},
            {{"op": "tcp", "host": "{OTHER_V4[1]}", "port": 80}}])],
            on_connect=on_connect, capture_output=True)
        print(json.dumps([e.to_dict() for e in result.events if e.TYPE == "policy_error"]))
    """)
    proc = world.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 and all(e["subject"].isdigit() for e in errors)
    assert proc.stderr.count("LOG corral.api policy callback on_connect failed") == 1, proc.stderr
