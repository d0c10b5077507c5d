"""Every entry point's ``--help`` (and the subcommands' help) runs as ``python -m contra_ray.<name>`` and exits
0, its usage line naming the program."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

ENTRY_POINTS = [("distill",), ("pipeline",), ("evaluate",), ("tune",), ("report",), ("analyze",), ("nas",),
                ("data",), ("export",), ("analyze", "correlation"),
                ("data", "prepare")]


@pytest.mark.parametrize("command", ENTRY_POINTS, ids=" ".join)
def test_help_exits_0_and_names_the_program(command, tmp_path):
    name, *sub = command
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"contra_ray.{name}", *sub, "--help"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prog = " ".join([f"python -m contra_ray.{name}", *sub])
    assert re.match(rf"usage: {re.escape(prog)}\s", proc.stdout), proc.stdout[:500]
