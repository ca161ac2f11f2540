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


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "examples").glob("*.py")))
def test_example_help_shows_every_default(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = re.findall(r"^  (--[\w-]+)", proc.stdout, re.M)
    assert "--out" in options and "--device" in options, proc.stdout
    assert proc.stdout.count("(default:") == len(options), f"{script} --help: an option shows no default:\n{proc.stdout}"
