"""What users read is true: public docstrings name exactly their parameters, every CLI option has help text,
the documented command lines parse, the examples' --help shows defaults."""
import argparse
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ppap_fast

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.items()


def _parsers():
    from ppap_fast.cli import _parser as cli_parser
    from ppap_fast.distributed import _parser as dist_parser

    for prog, p in (("ppap-fast", cli_parser()), ("python -m ppap_fast.distributed", dist_parser())):
        yield prog, p
        for name, s in _subparsers(p):
            yield f"{prog} {name}", s


@pytest.mark.parametrize("prog, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_cli_option_has_help_and_shows_its_default(prog, parser):
    assert parser.description, f"{prog} --help says nothing about what it does"
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flag = "/".join(a.option_strings) or a.dest
        bare = (a.help or "").replace("(default: %(default)s)", "").replace("default: %(default)s", "").strip()
        assert bare, f"{prog} {flag} has no help text"
        if a.option_strings and not a.required and a.default not in (None, False, argparse.SUPPRESS) \
                and not isinstance(a, argparse._StoreFalseAction):
            assert "default" in a.help, f"{prog} {flag}: --help does not show its default {a.default!r}"


def test_mutually_exclusive_options_are_stated_in_help():
    from ppap_fast.cli import _parser

    guided = dict(_subparsers(_parser()))["guided-sample"]
    no_fast = next(a for a in guided._actions if "--no-fast" in a.option_strings)
    for fast_only in ("--guide-dtype", "--cuda-graph", "--compile", "--fuse-norm-act"):  # refused with --no-fast
        assert fast_only in no_fast.help, no_fast.help


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_example_help_shows_every_default(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = re.findall(r"^  (--[\w-]+)", proc.stdout, re.M)
    assert "--out" in options and "--device" in options, proc.stdout
    assert proc.stdout.count("(default:") == len(options), f"{script} --help: an option shows no default:\n{proc.stdout}"
