"""The `spruce` command: info, demo (quick), errors."""

from __future__ import annotations

import json
import subprocess
import sys

import spruce
from spruce.cli import main


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "spruce" in out and "threads" in out and "cuda" in out
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["spruce"] == spruce.__version__
    assert facts["build profile"] in ("release", "debug")
    assert facts["threads"] == spruce.num_threads()


def test_demo_quick_checks_every_row(capsys):
    assert main(["demo", "--quick", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "per-row 50% mask" in out and "2:4 mask" in out and "global 50%" in out
    assert "FAIL" not in out


def test_console_script_and_module_entry():
    r = subprocess.run(
        [sys.executable, "-m", "spruce.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and spruce.__version__ in r.stdout


def test_unknown_command_is_a_usage_error(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as e:
        assert e.code == 2
    else:  # pragma: no cover - argparse always exits
        raise AssertionError("argparse accepted an unknown command")
    assert "invalid choice" in capsys.readouterr().err
