"""Docs that run (issue 12.6): every fenced code block of README.md and docs/*.md is
either run here or marked as what it is.

- ``python``: run verbatim as a script in the test world (exit 0), from a scratch
  directory holding ``out/``, with a throw-away ``$HOME`` and the venv's ``pip`` first on
  PATH (pip talks only to the world, where pypi.org is a documentation address).
- ``allowlist``: parsed by ``--allow-file``'s parser.
- ``sh``: commands of this repository (``scripts/...``) that CI itself runs.
- ``console``: a transcript, checked against a real run where one is named (the README's
  "30 seconds" transcript: tests/test_demo.py).
- ``text``, ``json``: output or syntax, shown as is.
"""

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.S | re.M)
KINDS = {"python", "allowlist", "sh", "console", "text", "json"}


def blocks():
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            line = text[:match.start()].count("\n") + 1
            yield doc.relative_to(ROOT), line, match.group(1).strip(), match.group(2)


ALL = list(blocks())


def _ids(kind):
    return [pytest.param(body, id="%s:%d" % (doc, line))
            for doc, line, tag, body in ALL if tag == kind]


@pytest.mark.parametrize("doc,line,tag", [(d, n, t) for d, n, t, _ in ALL],
                         ids=["%s:%d" % (d, n) for d, n, _, _ in ALL])
def test_every_code_block_says_what_it_is(doc, line, tag):
    assert tag in KINDS, ("%s:%d: a code block tagged %r: tag it python (run by this test), "
                          "allowlist, sh, console, text or json" % (doc, line, tag))


@pytest.mark.namespaces
@pytest.mark.network
@pytest.mark.parametrize("body", _ids("python"))
def test_python_examples_run_verbatim(body, world, tmp_path):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    script = work / "example.py"
    script.write_text(body)
    env = dict(os.environ, HOME=str(home), PIP_RETRIES="0", PIP_TIMEOUT="5", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    result = world.run([sys.executable, str(script)], cwd=str(work), env=env,
                       capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "stdout:\n%s\nstderr:\n%s" % (result.stdout[-3000:],
                                                                 result.stderr[-3000:])


@pytest.mark.parametrize("body", _ids("allowlist"))
def test_allowlist_examples_parse(body, tmp_path):
    from corral.policy import load_allow_file

    path = tmp_path / "allow.txt"
    path.write_text(body)
    assert load_allow_file(path)


@pytest.mark.parametrize("body", _ids("sh"))
def test_shell_blocks_name_scripts_that_ci_runs(body):
    ci = (ROOT / ".ci" / "run").read_text()
    for line in body.splitlines():
        command = line.split("#", 1)[0].strip()
        if not command:
            continue
        program = shlex.split(command)[0]
        assert (ROOT / program).is_file() and os.access(ROOT / program, os.X_OK), line
        assert program in ci, "%s is not run by .ci/run" % program


def test_every_test_named_in_the_docs_exists():
    """docs/security.md backs each claim with tests by name (`test_x.py::test_y`, then
    `::test_z` for more of the same file): each must exist, or the claim has no proof."""
    missing = []
    for doc in DOCS:
        current = None
        for match in re.finditer(r"`(?:(?:tests/)?(test_\w+\.py))?::(test_\w+)(?:\[[^\]]*\])?`", doc.read_text()):
            current = match.group(1) or current
            if current is None:
                continue
            path = ROOT / "tests" / current
            if not path.is_file() or not re.search(r"def %s\b" % match.group(2), path.read_text()):
                missing.append("%s: %s::%s" % (doc.name, current, match.group(2)))
    assert not missing, "\n".join(missing)
