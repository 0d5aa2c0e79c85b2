"""carnk-pkpd validate and demo: exit 0 with a summary, 1 with every problem, 2 on usage errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import csv_text, with_cell, with_subject, write
from typer.testing import CliRunner

from carnk_pkpd import __version__
from carnk_pkpd.cli import app
from carnk_pkpd.data import embedded_cohort_path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def squash(text: str) -> str:
    """Output with runs of whitespace made single spaces (rich wraps lines to the terminal width)."""
    return re.sub(r"\s+", " ", text)


def test_validate_valid_file_prints_counts_and_exits_0(runner, tmp_path):
    path = write(tmp_path, csv_text())
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    out = squash(result.stdout)
    assert "2 subjects, 17 records, 11 observations" in out
    assert "Observations per DVID" in out
    assert "SYNTHETIC" not in out
    assert result.stderr == ""


def test_validate_synthetic_file_shows_the_banner(runner):
    result = runner.invoke(app, ["validate", str(embedded_cohort_path())])
    assert result.exit_code == 0, result.output
    out = squash(result.stdout)
    assert "SYNTHETIC cohort: simulated numbers, not trial data" in out
    assert "3 subjects" in out


def test_validate_defective_file_lists_problems_on_stderr_and_exits_1(runner, tmp_path):
    path = write(tmp_path, with_cell(5, "DV", "-2"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:5:DV: negative DV (found -2, expected DV >= 0" in result.stderr
    assert f"{path}: 1 problem(s) found" in result.stderr
    assert result.stdout == ""


def test_validate_checks_every_file_and_fails_if_one_fails(runner, tmp_path):
    good = write(tmp_path, csv_text(), "good.csv")
    bad = write(tmp_path, with_cell(4, "AMT", "0"), "bad.csv")
    missing = tmp_path / "missing.csv"
    result = runner.invoke(app, ["validate", str(good), str(bad), str(missing)])
    assert result.exit_code == 1
    assert "2 subjects" in squash(result.stdout)
    assert f"{bad}:4:AMT: EVID=1 infusion without a positive AMT" in result.stderr
    assert f"{missing}: file not found" in result.stderr


def test_validate_prints_warnings_with_prefix_and_still_exits_0(runner, tmp_path):
    text = with_subject([["3", "0", "1", "1.5", ".", ".", "1", "0", ".", "2", "50", "1", "60"]])
    path = write(tmp_path, text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: subject 3 has infusions but no observations yet" in result.stderr


def test_validate_semicolon_file(runner, tmp_path):
    result = runner.invoke(app, ["validate", str(write(tmp_path, csv_text(sep=";")))])
    assert result.exit_code == 0, result.output
    assert "2 subjects" in squash(result.stdout)


def test_validate_without_files_is_a_usage_error(runner):
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_unknown_option_is_a_usage_error(runner, tmp_path):
    result = runner.invoke(app, ["validate", "--frobnicate", str(write(tmp_path, csv_text()))])
    assert result.exit_code == 2


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"carnk-pkpd {__version__}"


def test_help_lists_validate_and_demo(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "validate" in result.stdout and "demo" in result.stdout


def test_installed_console_script_exit_codes(tmp_path):
    exe = Path(sys.executable).parent / "carnk-pkpd"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    bad = write(tmp_path, with_cell(5, "DV", "-2"))
    failed = subprocess.run([exe, "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert f"{bad}:5:DV: negative DV" in failed.stderr
    usage = subprocess.run([exe, "validate"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2
