"""The environment scrub as a documented policy: every rule with a variable it drops and a
harmless near miss it keeps, the value shapes, --env, and the dropped names in --events."""

import json
import os

import pytest

from corral import Config
from corral.config import HARMLESS_ENV_NAMES, SECRET_ENV_PATTERNS, SECRET_ENV_VALUES, looks_secret

from conftest import corral

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjaSIsImpvYiI6MX0.c2lnbmF0dXJlc2lnbmF0dXJl"

# rule -> (a NAME it drops, a harmless NAME it keeps)
NAME_TABLE = {
    "*TOKEN*": ("NPM_AUTHTOKEN", "TOKNE_COUNT"),
    "*SECRET*": ("CLIENT_SECRET", "SECTOR"),
    "*PASSW*": ("PGPASSWORD", "PASSENGER_ENV"),
    "*PASSPHRASE*": ("GPG_PASSPHRASE", "PHRASEBOOK"),
    "*_PASS": ("SMTP_PASS", "SSH_ASKPASS"),
    "*_PWD": ("MYSQL_PWD", "PWD"),
    "PAT": ("PAT", "PATH"),
    "*_PAT": ("GH_PAT", "PYTHONPATH"),
    "*JWT*": ("CI_JOB_JWT", "JW_PLAYER"),
    "KEY": ("KEY", "KEYMAP"),
    "*_KEY": ("DEPLOY_KEY", "KEYBOARD_LAYOUT"),
    "*_KEYS": ("SIGNING_KEYS", "HOTKEYS"),
    "*_KEY_*": ("AWS_ACCESS_KEY_ID", "MONKEY_ID"),
    "*APIKEY*": ("SENDGRID_APIKEY", "API_VERSION"),
    "*AUTH*": ("HTTP_AUTHORIZATION", "XAUTHORITY"),
    "*COOKIE*": ("COOKIE", "COOKBOOK"),
    "*WEBHOOK*": ("SLACK_WEBHOOK_URL", "HOOK_DIR"),
    "*CREDENTIAL*": ("GOOGLE_APPLICATION_CREDENTIALS", "CREDIT_LIMIT"),
    "*CREDS*": ("DOCKER_CREDS", "CREDO"),
    "*PRIVATE*": ("PRIVATE_KEY_PEM", "PRIV_ESC_TEST"),
    "NPM_CONFIG_//*": ("npm_config_//registry.npmjs.org/:_authToken", "npm_config_cache"),
    "YARN_NPM_*": ("YARN_NPM_REGISTRY_SERVER", "YARN_CACHE_FOLDER"),
    "POETRY_HTTP_BASIC_*": ("POETRY_HTTP_BASIC_PRIVATE_USERNAME", "POETRY_VIRTUALENVS_IN_PROJECT"),
    "POETRY_PYPI_*": ("POETRY_PYPI_TOKEN_PYPI", "POETRY_CACHE_DIR"),
    "UV_INDEX_*_USERNAME": ("UV_INDEX_INTERNAL_USERNAME", "UV_INDEX_URL"),
    "TWINE_USERNAME": ("TWINE_USERNAME", "TWINE_REPOSITORY"),
    "DOCKER_AUTH_CONFIG": ("DOCKER_AUTH_CONFIG", "DOCKER_HOST"),
    "AWS_*": ("AWS_PROFILE", "AWSOME"),
    "AZURE_*": ("AZURE_CLIENT_ID", "AZUREBLUE"),
    "GCLOUD_*": ("GCLOUD_PROJECT", "GCLOUDY"),
    "VAULT_*": ("VAULT_ADDR", "VAULTED"),
    "GPG_AGENT_INFO": ("GPG_AGENT_INFO", "GPG_TTY"),
    "DBUS_SESSION_BUS_ADDRESS": ("DBUS_SESSION_BUS_ADDRESS", "DBUS_STARTER_BUS_TYPE"),
    "KRB5CCNAME": ("KRB5CCNAME", "KRB5_CONFIG"),
    "OP_SESSION_*": ("OP_SESSION_my_team", "OP_BIOMETRIC_UNLOCK_ENABLED"),
    "BW_SESSION": ("BW_SESSION", "DESKTOP_SESSION"),
}
HARMLESS_TABLE = {  # rule -> (a name it keeps although a pattern matches it, a near miss still dropped)
    "XAUTHORITY": ("XAUTHORITY", "XAUTH_TOKEN"),
    "ICEAUTHORITY": ("ICEAUTHORITY", "ICE_AUTH"),
    "GIT_AUTHOR_*": ("GIT_AUTHOR_EMAIL", "GIT_AUTH_HEADER"),
    "TOKENIZERS_PARALLELISM": ("TOKENIZERS_PARALLELISM", "TOKENIZER_SECRET"),
}
# value shape -> (a value it drops, a harmless value it keeps)
VALUE_TABLE = {
    "url-password": ("postgres://u:pw@db.example/app", "https://user@host.example:8080/a:b@c"),
    "jwt": (JWT, "eyJ"),
    "github-token": ("ghp_" + "a1" * 18, "ghp_short"),
    "gitlab-token": ("glpat-" + "x" * 20, "glpat-"),
    "slack-token": ("xoxb-1234-5678-abcdefgh", "xoxo-hugs"),
    "aws-access-key": ("AKIA" + "ABCDEFGHIJ234567", "AKIA"),
    "api-key": ("sk-proj-" + "Ab3" * 8, "task-runner-with-a-very-long-name"),
    "stripe-key": ("sk_live_" + "a" * 24, "sk_live"),
    "npm-token": ("npm_" + "A1" * 18, "npm_config"),
    "pypi-token": ("pypi-AgEIcHlwaS5vcmc" + "x" * 10, "pypi-simple"),
    "huggingface-token": ("hf_" + "Ab" * 17, "hf_home"),
    "google-api-key": ("AIza" + "S" * 35, "AIzaShort"),
    "private-key": ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl", "-----BEGIN CERTIFICATE-----"),
}
ALWAYS_KEPT = ["PATH", "HOME", "TERM", "LANG", "LC_ALL", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "SSH_TTY",
               "SSH_CONNECTION", "DISPLAY", "XAUTHORITY", "ICEAUTHORITY", "KEYMAP", "KEYBOARD_LAYOUT", "EDITOR",
               "MANPATH", "PYTHONPATH", "LD_LIBRARY_PATH", "PKG_CONFIG_PATH", "XDG_SESSION_TYPE",
               "XDG_RUNTIME_DIR", "DESKTOP_SESSION", "GIT_AUTHOR_NAME", "TOKENIZERS_PARALLELISM", "HOSTNAME", "TMPDIR", "COLORTERM"]


def test_every_rule_has_a_table_row():
    assert set(NAME_TABLE) == {p for p, _ in SECRET_ENV_PATTERNS}
    assert set(HARMLESS_TABLE) == {p for p, _ in HARMLESS_ENV_NAMES}
    assert set(VALUE_TABLE) == {n for n, *_ in SECRET_ENV_VALUES}


@pytest.mark.parametrize("rule", sorted(NAME_TABLE))
def test_name_rule_drops_and_keeps(rule):
    dropped, kept = NAME_TABLE[rule]
    assert looks_secret(dropped, "x"), dropped
    assert looks_secret(dropped.lower(), "x"), dropped  # names match case-insensitively
    assert not looks_secret(kept, "x"), kept


@pytest.mark.parametrize("rule", sorted(HARMLESS_TABLE))
def test_harmless_name_is_kept(rule):
    kept, dropped = HARMLESS_TABLE[rule]
    assert not looks_secret(kept, "/home/u/.Xauthority")
    assert looks_secret(dropped, "x")


@pytest.mark.parametrize("shape", sorted(VALUE_TABLE))
def test_value_shape_drops_and_keeps(shape):
    dropped, kept = VALUE_TABLE[shape]
    assert looks_secret("HARMLESS_SETTING", dropped)
    assert not looks_secret("HARMLESS_SETTING", kept)


@pytest.mark.parametrize("name", ALWAYS_KEPT)
def test_common_variables_are_kept(name):
    assert not looks_secret(name, os.environ.get(name, "/usr/local/bin:/usr/bin:/bin"))


ISSUE_EXAMPLES = {
    "GH_PAT": "p", "GITHUB_PAT": "p", "CI_JOB_JWT": JWT, "NPM_AUTHTOKEN": "n", "GPG_PASSPHRASE": "g",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.example/services/T0/B0/x", "COOKIE": "session=1",
    "npm_config_//registry.npmjs.org/:_authToken": "t", "DATABASE_URL": "postgres://u:pw@db.example/app",
    "BUILD_NOTE": "ghp_" + "Z9" * 18,  # an innocent name carrying a GitHub token
}


def test_scrub_reports_dropped_names_and_honours_env():
    environ = {"PATH": "/usr/bin", "HOME": "/home/u", **ISSUE_EXAMPLES}
    env, dropped = Config(env=["GH_PAT", "COOKIE=set"]).scrub_env(environ)
    assert dropped == sorted(set(ISSUE_EXAMPLES) - {"GH_PAT", "COOKIE"})
    assert env == {"PATH": "/usr/bin", "HOME": "/home/u", "GH_PAT": "p", "COOKIE": "set"}


@pytest.mark.namespaces
def test_credential_env_vars_from_the_issue_never_get_inside_and_events_name_them(tmp_path):
    env = dict(os.environ, **ISSUE_EXAMPLES)
    events = tmp_path / "ev.jsonl"
    result = corral("run", "--net", "none", "--events", str(events), "--env", "GH_PAT", "--", "env", env=env)
    assert result.returncode == 0, result.stderr
    inside = dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)
    assert inside["GH_PAT"] == "p"  # kept on purpose
    assert not set(ISSUE_EXAMPLES) - {"GH_PAT"} & set(inside)
    text = events.read_text()
    start = next(e for e in map(json.loads, text.splitlines()) if e["type"] == "sandbox_start")
    assert set(start["env_dropped"]) >= set(ISSUE_EXAMPLES) - {"GH_PAT"}
    assert "GH_PAT" not in start["env_dropped"]
    for value in (JWT, "postgres://u:pw@db.example/app", ISSUE_EXAMPLES["BUILD_NOTE"]):
        assert value not in text  # names only, never values
