"""Issue 9 class 1, issue 14 class 6, issue 10 point 2: the files corral itself writes on
the host (``--report``, ``--suggest``, ``--events``, ``--pcap``, ``--keep-changes``) are
never reached through a link or a directory the sandbox planted or swapped, and an output
that cannot be written is refused before the command runs.

Every attack runs the real CLI as the unprivileged user, in a writable working directory
(where the sandbox can plant whatever it likes), against a fake ``$HOME``.
"""

import json
import os
import stat

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces

RC = "# the user's own shell start-up file\n"
# Options of every kind of output file; each writes a file at its path.
FILE_OPTIONS = ("--report", "--suggest", "--events", "--pcap")


@pytest.fixture
def work(tmp_path, home):
    (home / ".bashrc").write_text(RC)
    work = tmp_path / "work"
    work.mkdir()
    return work


def run(work, home, *args, script="true"):
    return corral("run", *args, "--", "sh", "-c", script, cwd=work,
                  env=dict(os.environ, HOME=str(home)), timeout=60)


def net_for(option):
    return () if option == "--pcap" else ("--net", "none")


def one_line(stderr):
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_output_symlink_to_bashrc_planted_by_the_sandbox_is_not_followed(work, home, option):
    result = run(work, home, *net_for(option), option, "out",
                 script=f'ln -sf "$HOME/.bashrc" out')
    assert (home / ".bashrc").read_text() == RC
    if option in ("--events", "--pcap"):  # opened before the command ran: our own file
        assert result.returncode == 0, result.stderr
    else:  # written at exit: the planted link is refused, one line naming it
        assert result.returncode == 2, result.stderr
        line = one_line(result.stderr)
        assert "out" in line and "symlink" in line
        assert os.readlink(work / "out") == str(home / ".bashrc")


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_output_symlink_left_by_an_earlier_run_is_refused_before_the_command(work, home, option):
    (work / "out").symlink_to(home / ".bashrc")
    result = run(work, home, *net_for(option), option, "out", script="touch ran")
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert option in line and "out" in line and "symlink" in line
    assert not (work / "ran").exists()
    assert (home / ".bashrc").read_text() == RC


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_output_parent_swapped_for_a_symlink_to_home_does_not_redirect(work, home, option):
    (work / "out").mkdir()
    result = run(work, home, *net_for(option), option, "out/.bashrc",
                 script=f'mv out out.old && ln -s "$HOME" out')
    assert result.returncode == 0, result.stderr
    assert (home / ".bashrc").read_text() == RC
    assert (work / "out.old" / ".bashrc").stat().st_size > 0  # where the user's dir went


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_output_hardlink_to_a_host_file_is_replaced_not_written_through(work, home, option):
    victim = work / "victim"  # a host file the sandbox can link to (same mount)
    victim.write_text(RC)
    result = run(work, home, *net_for(option), option, "out", script="ln -f victim out")
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == RC
    # the same attack left behind by an earlier run
    os.unlink(work / "out")
    os.link(victim, work / "out")
    result = run(work, home, *net_for(option), option, "out")
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == RC
    assert (work / "out").stat().st_ino != victim.stat().st_ino


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_output_fifo_planted_at_the_target_does_not_block(work, home, option):
    result = run(work, home, *net_for(option), option, "out", script="rm -f out; mkfifo out")
    assert result.returncode == 0, result.stderr
    # left by an earlier run: nobody will ever read it
    os.unlink(work / "out")
    os.mkfifo(work / "out")
    result = run(work, home, *net_for(option), option, "out")
    assert result.returncode == 0, result.stderr
    assert stat.S_ISREG((work / "out").stat().st_mode)


@pytest.mark.parametrize("option", FILE_OPTIONS + ("--keep-changes",))
def test_output_into_a_missing_directory_is_refused_before_the_command(work, home, option):
    result = run(work, home, *net_for(option), option, "no-such-dir/out", script="touch ran")
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert option in line and "no-such-dir" in line
    assert not (work / "ran").exists()


def test_report_and_suggest_are_written_where_asked(work, home):
    result = run(work, home, "--net", "none", "--report", "r.json", "--suggest", "s.txt",
                 "--events", "e.jsonl")
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "r.json").read_text())["schema"] == "corral.audit/1"
    assert (work / "s.txt").read_text().startswith("#")
    assert '"sandbox_start"' in (work / "e.jsonl").read_text()
    assert not [p for p in os.listdir(work) if ".corral-" in p]  # no temp file left


def test_events_dash_is_stderr(work, home):
    result = run(work, home, "--net", "none", "--events", "-")
    assert result.returncode == 0, result.stderr
    assert b'"type":"sandbox_exit"' in result.stderr


def test_keep_changes_symlink_planted_at_dir_is_not_followed(work, home, tmp_path):
    from corral.launch import remove_tree

    (home / "target").mkdir()
    scratch = tmp_path / "scratch"
    result = run(work, home, "--net", "none", "--scratch", str(scratch), "--keep-changes", "kept",
                 script='echo x > /etc/corral-keep-test; ln -s "$HOME/target" kept')
    assert result.returncode == 0, result.stderr
    assert os.listdir(home / "target") == []
    line = one_line(result.stderr)
    assert "kept" in line and "symlink" in line and str(scratch) in line  # where the record is
    remove_tree(scratch)


def test_keep_changes_parent_swapped_for_a_symlink_does_not_redirect(work, home):
    (work / "out").mkdir()
    result = run(work, home, "--net", "none", "--keep-changes", "out/kept",
                 script='echo x > /etc/corral-keep-test; mv out out.old && ln -s "$HOME" out')
    assert result.returncode == 0, result.stderr
    assert not (home / "kept").exists()
    from corral.fs.changes import collect_changes

    changes = {c.path: c.change for c in collect_changes(work / "out.old" / "kept").changes}
    assert changes.get("/etc/corral-keep-test") == "created"


def test_keep_changes_symlink_left_by_an_earlier_run_is_refused(work, home):
    (work / "kept").symlink_to(home)
    result = run(work, home, "--net", "none", "--keep-changes", "kept", script="touch ran")
    assert result.returncode == 2, result.stderr
    assert "--keep-changes" in one_line(result.stderr)
    assert not (work / "ran").exists()


def test_api_run_writes_the_outputs_it_is_given_without_a_network(work, home, monkeypatch):
    import corral

    monkeypatch.chdir(work)
    (work / "r.json").symlink_to(home / ".bashrc")
    with pytest.raises(corral.ConfigError, match="--report r.json: is a symlink"):
        corral.run(["true"], net="none", report="r.json")
    os.unlink(work / "r.json")
    result = corral.run(["true"], net="none", report="r.json", events="e.jsonl")
    assert result.exit_code == 0 and result.report is not None
    assert json.loads((work / "r.json").read_text())["schema"] == "corral.audit/1"
    assert (work / "e.jsonl").read_text().count("\n") >= 2
    assert (home / ".bashrc").read_text() == RC


@pytest.mark.parametrize("variable", ["CORRAL_NETSTACK_CPUPROFILE", "CORRAL_NETSTACK_GOROUTINES"])
def test_netstack_debug_file_symlink_to_bashrc_is_not_followed(work, home, variable):
    """The netstack's developer knobs write files too: created before the command runs,
    never opened by name."""
    (work / "dbg").symlink_to(home / ".bashrc")  # left by an earlier run
    env = dict(os.environ, HOME=str(home), **{variable: "dbg"})
    result = corral("run", "--", "sh", "-c", 'rm -f dbg; ln -s "$HOME/.bashrc" dbg', cwd=work,
                    env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (home / ".bashrc").read_text() == RC


def test_report_to_dev_stdout_and_dev_null_use_corral_s_own_descriptors(work, home):
    result = run(work, home, "--net", "none", "--report", "/dev/stdout", "--suggest", "/dev/null")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == "corral.audit/1"


def test_output_that_is_a_directory_is_refused_before_the_command(work, home):
    (work / "out").mkdir()
    result = run(work, home, "--net", "none", "--report", "out", script="touch ran")
    assert result.returncode == 2, result.stderr
    assert "--report out: is a directory" in one_line(result.stderr)
    assert not (work / "ran").exists()


def test_keep_changes_across_filesystems_says_where_the_record_is_and_how_to_fix(work, home):
    from corral.launch import remove_tree

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(work).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's directory")
    scratch = f"/dev/shm/corral-test-{os.getpid()}"
    try:
        result = run(work, home, "--net", "none", "--scratch", scratch, "--keep-changes", "kept",
                     script="echo x > /etc/corral-keep-test")
        assert result.returncode == 0, result.stderr
        line = one_line(result.stderr)
        assert "kept" in line and "--scratch" in line and scratch in line
        assert not (work / "kept").exists()
    finally:
        remove_tree(scratch)
