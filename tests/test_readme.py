"""The README's test command is what CI runs, and the README documents every subcommand."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    ci = _read(".ci/run")
    (command,) = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
    assert command in _read("README.md")


def test_readme_mentions_every_subcommand_and_has_no_unfilled_sections():
    readme = _read("README.md")
    from ctgen.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"ctgen {name}" in readme, name
    assert not re.search(r"\b[A-Z]+_(SECTION|MINUTES)\b", readme)
