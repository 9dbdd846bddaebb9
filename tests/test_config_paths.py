"""Relative paths in Config and on the command line are resolved against the caller's
working directory (issue 12.6): ``rw=["./out"]`` works as a CLI user expects."""

import os

import pytest

from corral import Config
from corral.errors import ConfigError


def test_relative_mount_paths_resolve_against_the_callers_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config(rw=["./out"], ro=["a/../b"], hide=["c"], cwd="proj",
                    path_order=[("overlay", "d")])
    assert config.rw == (str(tmp_path / "out"),)
    assert config.ro == (str(tmp_path / "b"),)
    assert config.hide == (str(tmp_path / "c"),)
    assert config.cwd == str(tmp_path / "proj")
    assert config.path_actions() == (("overlay", str(tmp_path / "d")),)


def test_path_order_items_must_be_pairs():
    with pytest.raises(ConfigError, match="pairs"):
        Config(path_order=[("rw",)])


@pytest.mark.namespaces
def test_cli_rw_relative_path_is_writable(tmp_path, cli):
    (tmp_path / "out").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    result = cli("run", "--net", "none", "--cwd", str(work), "--rw", "../out", "--",
                 "sh", "-c", "echo hi > %s/out/x" % tmp_path, cwd=str(work), text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "x").read_text() == "hi\n"
    assert os.path.isdir(work)
