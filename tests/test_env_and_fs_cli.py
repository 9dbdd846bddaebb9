"""Issue 2 items 4 and 9 through the CLI, as a user sees them: the environment
is scrubbed of credentials, the host cannot be changed, secrets are hidden.
(The mount plan and executor are tested in depth in test_fs_plan.py and
test_fs_mounts.py.)"""

import os

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces


def _env_inside(env, *extra):
    result = corral("run", "--net", "none", *extra, "--", "env", env=env)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)


CREDENTIALS = {
    "GITHUB_TOKEN": "ghp_x", "AWS_SECRET_ACCESS_KEY": "a", "AWS_PROFILE": "p",
    "NPM_TOKEN": "n", "OPENAI_API_KEY": "k", "MY_SERVICE_PASSWORD": "pw",
    "DB_SECRET_URL": "s", "SSH_AUTH_SOCK": "/tmp/agent.sock", "GH_TOKEN": "g",
    "DEPLOY_KEY": "d", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1/bus",
}


def test_credential_environment_variables_are_dropped():
    env = dict(os.environ, **CREDENTIALS, HARMLESS_SETTING="keep me")
    inside = _env_inside(env)
    for name in CREDENTIALS:
        assert name not in inside, name
    assert inside["HARMLESS_SETTING"] == "keep me"
    assert inside["PATH"] == env["PATH"]


def test_env_option_keeps_or_sets_a_variable():
    env = dict(os.environ, GITHUB_TOKEN="ghp_keep")
    inside = _env_inside(env, "--env", "GITHUB_TOKEN", "--env", "NEW_ONE=set inside")
    assert inside["GITHUB_TOKEN"] == "ghp_keep"
    assert inside["NEW_ONE"] == "set inside"


def test_dotfile_etc_and_usr_writes_never_reach_the_host(home, tmp_path):
    (home / ".bashrc").write_text("original\n")
    work = tmp_path / "work"
    work.mkdir()
    script = (
        "echo evil >> ~/.bashrc; echo evil >> /etc/hostname-corral-test 2>/dev/null; "
        "echo evil > /usr/corral-test-file 2>/dev/null; cat ~/.bashrc"
    )
    result = corral("run", "--net", "none", "--", "sh", "-c", script, cwd=work,
                    env=dict(os.environ, HOME=str(home)))
    assert result.stdout == b"original\nevil\n"  # the write succeeded inside...
    assert (home / ".bashrc").read_text() == "original\n"  # ...and never left
    assert not os.path.exists("/etc/hostname-corral-test")
    assert not os.path.exists("/usr/corral-test-file")


def test_cwd_writes_land_on_the_host(tmp_path):
    result = corral("run", "--net", "none", "--", "sh", "-c", "echo made > here.txt",
                    cwd=tmp_path)
    assert result.returncode == 0
    assert (tmp_path / "here.txt").read_text() == "made\n"


def test_ssh_keys_and_cloud_credentials_are_unreadable(home, tmp_path):
    for rel in (".ssh/id_ed25519", ".aws/credentials", ".config/gh/hosts.yml", ".netrc"):
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("secret-material\n")
    work = tmp_path / "work"
    work.mkdir()
    result = corral("run", "--net", "none", "--", "sh", "-c",
                    "cat ~/.ssh/id_ed25519 ~/.aws/credentials ~/.config/gh/hosts.yml ~/.netrc",
                    cwd=work, env=dict(os.environ, HOME=str(home)))
    assert b"secret-material" not in result.stdout


def test_readonly_mode_refuses_writes_outside_cwd_and_tmp(home, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = corral("run", "--net", "none", "--mode", "readonly", "--", "sh", "-c",
                    "touch ~/x 2>/dev/null && echo home-writable; touch /tmp/ok && "
                    "touch ./ok && echo cwd-and-tmp-writable",
                    cwd=work, env=dict(os.environ, HOME=str(home)))
    assert result.stdout == b"cwd-and-tmp-writable\n"
    assert (work / "ok").exists() and not (home / "x").exists()


def test_hermetic_mode_shows_only_what_is_mounted(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = corral("run", "--net", "none", "--mode", "hermetic", "--ro", "/usr", "--ro", "/lib",
                    "--ro", "/lib64", "--ro", "/bin", "--", "/bin/sh", "-c",
                    "ls /etc 2>/dev/null | wc -l; test -e /home && echo has-home; echo ok",
                    cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"0", b"ok"]


def test_running_in_home_says_home_is_an_overlay_and_rw_home_warns(home):
    result = corral("run", "--net", "none", "--", "true", cwd=home,
                    env=dict(os.environ, HOME=str(home)))
    assert result.returncode == 0
    assert b"holds your home directory: it is an overlay" in result.stderr
    result = corral("run", "--net", "none", "--rw", str(home), "--", "true", cwd=home,
                    env=dict(os.environ, HOME=str(home)))
    assert result.returncode == 0
    assert b"whole home directory is writable, startup files included" in result.stderr


def test_keep_changes_keeps_what_the_command_changed(tmp_path):
    work, kept = tmp_path / "work", tmp_path / "kept"
    work.mkdir()
    result = corral("run", "--net", "none", "--keep-changes", str(kept), "--", "sh", "-c",
                    "echo planted > /etc/corral-kept-test", cwd=work)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists("/etc/corral-kept-test")
    from corral.fs.changes import collect_changes

    changes = {c.path: c.change for c in collect_changes(kept).changes}
    assert changes.get("/etc/corral-kept-test") == "created"
