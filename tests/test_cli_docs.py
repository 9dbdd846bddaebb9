"""The command line explains itself (issue 12.5): every option of every subcommand
has a help line, and docs/cli.md lists every option the parser has."""

import argparse
import re
from pathlib import Path

import pytest

from corral import cli

DOCS = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, action


@pytest.mark.parametrize("command,action", list(_options()),
                         ids=lambda v: v if isinstance(v, str) else v.option_strings[-1])
def test_every_option_has_help_and_is_documented(command, action):
    assert action.help and action.help.strip(), "%s %s has no help text" % (command, action.option_strings)
    long = max(action.option_strings, key=len)
    assert re.search(r"`[^`]*%s\b" % re.escape(long), DOCS), \
        "docs/cli.md does not list `%s` (corral %s)" % (long, command)


def test_run_help_is_grouped_with_examples():
    text = _subparsers()["run"].format_help()
    for group in ("filesystem:", "process:", "limits:", "network:", "policy:", "output:",
                  "examples:"):
        assert group in text
