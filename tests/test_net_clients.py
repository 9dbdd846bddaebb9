"""Real clients under an allowlist (issue 3, item 9): curl over HTTP and HTTPS,
`pip download` from a local package index, `git clone` over (dumb) HTTP.  Each works
with `--allow <name>` and fails, without reaching the server, without it.
"""

import base64
import hashlib
import io
import json
import shutil
import subprocess
import zipfile

import pytest

from net_support import PY, corral, token
from world import HELLO_BODY, HTTP_V4, OTHER_V4

pytestmark = pytest.mark.network

HELLO = HELLO_BODY.decode()
INDEX_PORT = 8081  # our own package index on pypi.org's world address


def test_curl_https_with_the_world_ca(world, tmp_path):
    tok = token()
    argv = ["sh", "-c", f"""
curl -sS -m 5 --cacert {world.ca_cert} https://tls.corral.test/ &&
curl -sS -m 5 --cacert {world.ca_cert} https://www.corral.test/files/https-{tok}; echo "rc=$?"
"""]
    out = corral(world, tmp_path, ["--allow", "tls.corral.test", "--ro", str(world.ca_cert)], argv)
    assert out.proc.returncode == 0, out.dump()
    assert out.proc.stdout == HELLO + "rc=6\n", out.dump()
    seen = [r for r in world.http_requests() if r["tls"] and r["sni"] == "tls.corral.test"]
    assert seen, world.http_requests()[-3:]
    assert [r for r in world.http_requests() if r["path"] == f"/files/https-{tok}"] == []
    ev = out.connect(dst_ip=HTTP_V4, dst_port=443)
    assert (ev["verdict"], ev["rule"], ev["name"]) == ("allow", "tls.corral.test", "tls.corral.test")


# ---------------------------------------------------------------- pip download


def _wheel(name, version):
    """A minimal pure-Python wheel (bytes) and its file name."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: corral-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


@pytest.fixture(scope="module")
def package_index(world, tmp_path_factory):
    """A PEP 503 simple index served on pypi.org's world address (203.0.113.3:8081).

    The world's own /files/ route serves everything as application/octet-stream and
    no directory pages; pip skips index pages that are not text/html, so the index is
    served by `python -m http.server` (inside the world, on a world address)."""
    root = tmp_path_factory.mktemp("index")
    name = "corral-tiny"
    filename, data = _wheel("corral_tiny", "0.1")
    (root / "packages").mkdir()
    (root / "packages" / filename).write_bytes(data)
    project = root / "simple" / name
    project.mkdir(parents=True)
    sha = hashlib.sha256(data).hexdigest()
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../packages/{filename}#sha256={sha}">'
        f"{filename}</a></body></html>\n")
    (root / "simple" / "index.html").write_text(f'<a href="{name}/">{name}</a>\n')
    log = root / "access.log"
    server = world.popen([PY, "-u", "-m", "http.server", str(INDEX_PORT), "--bind", OTHER_V4[2],
                          "--directory", str(root)],
                         stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    ready = world.run(["curl", "-sS", "-m", "5", "--retry", "20", "--retry-connrefused",
                       "--retry-delay", "0", f"http://{OTHER_V4[2]}:{INDEX_PORT}/simple/"],
                      capture_output=True, text=True, timeout=30)
    assert ready.returncode == 0, ready.stderr
    yield name, filename, log
    server.kill()
    server.wait(timeout=5)


def _pip_download(world, tmp_path, options, name):
    dest = tmp_path / "dl"
    dest.mkdir()
    argv = [PY, "-m", "pip", "download", "--isolated", "--no-cache-dir", "--no-deps",
            "--disable-pip-version-check", "--timeout", "5", "--retries", "0",
            "--index-url", f"http://pypi.org:{INDEX_PORT}/simple/", "--trusted-host", "pypi.org",
            "-d", str(dest), name]
    out = corral(world, tmp_path, ["--rw", str(dest), *options], argv, timeout=90)
    return out, dest


def test_pip_download_works_with_allow(world, tmp_path, package_index):
    name, filename, log = package_index
    out, dest = _pip_download(world, tmp_path, ["--allow", "pypi.org"], name)
    assert out.proc.returncode == 0, out.dump()
    assert [p.name for p in dest.iterdir()] == [filename]
    assert out.dns(qname="pypi.org", verdict="allow")
    assert {e["verdict"] for e in out.connects(dst_ip=OTHER_V4[2])} == {"allow"}


def test_pip_download_fails_without_allow(world, tmp_path, package_index):
    name, filename, log = package_index
    before = log.read_text()
    out, dest = _pip_download(world, tmp_path, ["--allow", "example.com"], name)
    assert out.proc.returncode != 0, out.dump()
    assert list(dest.iterdir()) == []
    assert {e["verdict"] for e in out.dns(qname="pypi.org")} == {"deny"}
    assert out.connects(dst_ip=OTHER_V4[2]) == []
    assert log.read_text() == before  # the index never saw a request


# --------------------------------------------------------------------- git clone


@pytest.fixture(scope="module")
def git_repo(world, tmp_path_factory):
    if shutil.which("git") is None:
        pytest.fail("git is not installed. Fix: apt-get install -y git")
    work = tmp_path_factory.mktemp("gitwork")
    tok = token()
    bare = world.docroot / f"repo-{tok}.git"

    def git(*args, cwd=work):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@corral.test",
                        "-c", "init.defaultBranch=main", *args],
                       cwd=cwd, check=True, capture_output=True, timeout=30)

    git("init", "-q", "src")
    (work / "src" / "README").write_text("cloned through corral\n")
    git("add", "README", cwd=work / "src")
    git("commit", "-qm", f"commit {tok}", cwd=work / "src")
    git("clone", "-q", "--bare", str(work / "src"), str(bare))
    git("update-server-info", cwd=bare)
    return f"/files/{bare.name}", tok


def _clone(world, tmp_path, options, path):
    script = (f"git clone -q http://www.corral.test{path} /tmp/clone-$$ && "
              "cat /tmp/clone-$$/README && git -C /tmp/clone-$$ log --format=%s")
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    return corral(world, tmp_path, [*options, *(f"--env={k}={v}" for k, v in env.items())],
                  ["sh", "-c", script], timeout=90)


def test_git_clone_over_http_with_allow(world, tmp_path, git_repo):
    path, tok = git_repo
    out = _clone(world, tmp_path, ["--allow", "www.corral.test"], path)
    assert out.proc.returncode == 0, out.dump()
    assert out.proc.stdout == f"cloned through corral\ncommit {tok}\n"
    assert any(r["path"] == f"{path}/info/refs" for r in world.http_requests())


def test_git_clone_fails_without_allow(world, tmp_path, git_repo):
    path, _ = git_repo
    before = [r for r in world.http_requests() if r["path"].startswith(path)]
    out = _clone(world, tmp_path, ["--allow", "example.com"], path)
    assert out.proc.returncode != 0, out.dump()
    assert "Could not resolve host" in out.proc.stderr, out.proc.stderr
    assert [r for r in world.http_requests() if r["path"].startswith(path)] == before
    assert json.dumps(out.connects()) == "[]"
