"""Every connect and DNS event names the process inside (issue 13 point 1).

The sandboxed programs here are small Python scripts (written to a temp dir and run by
path, so their script name shows in the ancestry); the tests read ``process`` off the
``--events`` records.
"""

import json
import textwrap

import pytest

from net_support import PY, corral
from world import ECHO_V4, HTTP_V4, PORT_ECHO, PORT_HTTP

pytestmark = pytest.mark.network


def run(world, tmp_path, options, argv, **kw):
    """`corral run` with the test's temp dir visible (read-only) inside."""
    return corral(world, tmp_path, ["--ro", str(tmp_path), *options], argv, **kw)


def script(tmp_path, name, code):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    path.chmod(0o755)
    return str(path)


CONNECT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"x")
s.recv(10)
s.close()
"""


def test_connect_event_names_the_process_and_its_ancestry(world, tmp_path):
    child = script(tmp_path, "fetch.py", CONNECT)
    parent = script(tmp_path, "install.py", f"""
        import subprocess, sys
        sys.exit(subprocess.call([{PY!r}, {child!r}, {ECHO_V4!r}, "{PORT_ECHO}"]))
    """)
    out = run(world, tmp_path, ["--allow", ECHO_V4], ["sh", "-c", f"{PY} {parent}"])
    assert out.proc.returncode == 0, out.dump()
    ev = out.connect(dst_ip=ECHO_V4)
    proc = ev["process"]
    assert proc is not None, out.dump()
    assert proc["argv"] == [PY, child, ECHO_V4, str(PORT_ECHO)]
    assert proc["exe"].rsplit("/", 1)[-1].startswith("python")
    assert proc["ancestry"][0] in ("sh", "dash")
    print(json.dumps(ev))
    assert [a.split(" ")[-1] for a in proc["ancestry"][1:]] == ["install.py", "fetch.py"]
    assert proc["pid"] > 1 and proc["ppid"] > 1
    assert proc["cwd"]
