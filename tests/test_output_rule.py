"""The output rule (carnk_pkpd.atomic): a command writes only into a folder it creates or its own named
files; it never replaces a fit folder, a file that is not its own output, or a folder it did not
create; folders get the user's umask; Ctrl-C leaves nothing behind. The command-line cases run on
copies of the session's short fit (``small_fit``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carnk_pkpd.atomic import MARKER, atomic_folder, check_folder_output, folder_kind, output_files
from carnk_pkpd.cli import app
from carnk_pkpd.errors import OutputExists, OutputRefused

SRC = Path(__file__).resolve().parents[1] / "src"


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def fit_copy(small_fit, tmp_path) -> Path:
    dest = tmp_path / "run1"
    shutil.copytree(small_fit.path, dest, ignore=shutil.ignore_patterns("export", "doses", "report.html"))
    return dest


# --- the helper ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_new_folders_and_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_folder(tmp_path / "out", kind="doses", command="doses") as tmp:
            (tmp / "a.csv").write_text("x\n")
        with output_files(tmp_path / "out", command="doses") as tmp:
            (tmp / "b.csv").write_text("y\n")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for name in ("a.csv", "b.csv", MARKER):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def test_folder_rule_refuses_what_is_not_its_own(tmp_path):
    fit = tmp_path / "fit"
    fit.mkdir()
    (fit / "manifest.json").write_text("{}")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for dest in (fit, foreign, a_file):
        with pytest.raises(OutputRefused, match="Nothing was written"):
            check_folder_output(dest, "doses", command="doses")
    with atomic_folder(tmp_path / "d", kind="doses", command="doses", needs_overwrite=False) as tmp:
        (tmp / "ranking.csv").write_text("1\n")
    assert folder_kind(tmp_path / "d") == "doses"
    check_folder_output(tmp_path / "d", "doses", command="doses")  # its own earlier output: allowed
    with pytest.raises(OutputRefused, match="export"):
        check_folder_output(tmp_path / "d", "export", command="export")  # another command's folder
    (tmp_path / "d" / "extra.txt").write_text("user's")
    with pytest.raises(OutputRefused, match="extra.txt"):
        check_folder_output(tmp_path / "d", "doses", command="doses")
    with pytest.raises(OutputExists):
        check_folder_output(fit, "fit", command="fit", needs_overwrite=True)
    check_folder_output(fit, "fit", command="fit", needs_overwrite=True, overwrite=True)


def test_outputs_written_before_markers_existed_are_recognised(tmp_path):
    fit = tmp_path / "fit"
    (fit / "doses").mkdir(parents=True)
    for name in ("manifest.json", "posterior.nc", "remission.csv", "report.html", "remission.nc"):
        (fit / name).write_text("x")
    for name in ("ranking.csv", "doses.nc", "trajectories.png"):
        (fit / "doses" / name).write_text("x")
    assert folder_kind(fit / "doses") == "doses"
    check_folder_output(fit, "fit", command="fit", needs_overwrite=True, overwrite=True)
    check_folder_output(fit / "doses", "doses", command="doses")
    with output_files(fit, command="predict") as tmp:
        (tmp / "remission.csv").write_text("new")
    (fit / "doses" / "my_notes.txt").write_text("mine")  # no longer only doses outputs
    with pytest.raises(OutputRefused):
        check_folder_output(fit / "doses", "doses", command="doses")


def test_files_rule_replaces_only_its_own_files(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "remission.csv").write_text("the user's own table\n")
    with pytest.raises(OutputRefused, match="remission.csv"):
        with output_files(folder, command="predict") as tmp:
            (tmp / "remission.csv").write_text("new\n")
    assert (folder / "remission.csv").read_text() == "the user's own table\n"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    (folder / "remission.csv").unlink()
    for text in ("first\n", "second\n"):  # its own output is replaced on the next run
        with output_files(folder, command="predict") as tmp:
            (tmp / "remission.csv").write_text(text)
        assert (folder / "remission.csv").read_text() == text
    with pytest.raises(OutputRefused, match="predict"):
        with output_files(folder, command="export") as tmp:
            (tmp / "remission.csv").write_text("other\n")


def test_an_exception_inside_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "out", kind="doses", command="doses") as tmp:
            (tmp / "a").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# --- the commands ---------------------------------------------------------------------------------------------
def test_doses_into_the_fit_folder_or_onto_a_file_is_refused(fit_copy, tmp_path):
    from carnk_pkpd.fits import load_fit

    before = _snapshot(fit_copy)
    res = CliRunner().invoke(app, ["doses", str(fit_copy), "--out", str(fit_copy), "--workers", "0"])
    assert res.exit_code == 1 and "is a fit folder" in res.output and f"{fit_copy}/doses" in res.output
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    res = CliRunner().invoke(app, ["doses", str(fit_copy), "--out", str(a_file), "--workers", "0"])
    assert res.exit_code == 1 and "notes.txt" in res.output
    assert a_file.read_text() == "mine\n"
    assert _snapshot(fit_copy) == before
    load_fit(fit_copy)


def test_export_nc_into_the_fit_folder_is_refused(fit_copy):
    from carnk_pkpd.fits import load_fit

    before = _snapshot(fit_copy)
    res = CliRunner().invoke(app, ["export", str(fit_copy), "--format", "nc", "--out", str(fit_copy)])
    assert res.exit_code == 1 and "posterior.nc" in res.output and "fit" in res.output
    assert _snapshot(fit_copy) == before
    load_fit(fit_copy)


def test_predict_into_the_fit_folder_only_adds_its_own_files(fit_copy):
    from carnk_pkpd.fits import load_fit

    before = _snapshot(fit_copy)
    args = [
        "predict",
        str(fit_copy),
        "--dose",
        "2",
        "--visits",
        "180",
        "--patients",
        "2",
        "--out",
        str(fit_copy),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    after = _snapshot(fit_copy)
    assert {k: after[k] for k in before if k not in ("remission.nc", MARKER)} == {
        k: v for k, v in before.items() if k not in ("remission.nc", MARKER)
    }
    assert set(after) - set(before) <= {"remission.csv", "remission.nc", MARKER}
    first = (fit_copy / "remission.csv").read_text(encoding="utf-8").splitlines()
    assert first[0].startswith("# SYNTHETIC") and "carnk-pkpd" in first[1]
    load_fit(fit_copy)
    res = CliRunner().invoke(app, args)  # its own remission.csv is replaced on the next run
    assert res.exit_code == 0, res.output


def test_fit_refuses_a_folder_that_is_not_its_own_before_any_work(small_fit, tmp_path):
    data = str(small_fit.path / "data.csv")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["fit", data, "--out", str(mine), "--overwrite"])
    assert res.exit_code == 1 and "thesis.tex" in res.output
    assert (mine / "thesis.tex").read_text() == "years of work"
    existing = tmp_path / "fit"
    shutil.copytree(small_fit.path, existing)
    res = CliRunner().invoke(app, ["fit", data, "--out", str(existing)])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert time.perf_counter() - t0 < 20  # refused up front, not after sampling


def test_simulate_and_report_keep_files_they_did_not_write(small_fit, tmp_path):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("ID,TIME\n1,0\n")
    res = CliRunner().invoke(app, ["simulate", "--n-subjects", "1", "--out", str(cohort)])
    assert res.exit_code == 1 and "cohort.csv" in res.output
    assert cohort.read_text() == "ID,TIME\n1,0\n"
    page = tmp_path / "index.html"
    page.write_text("<html>mine</html>")
    res = CliRunner().invoke(app, ["report", str(small_fit.path), "--out", str(page)])
    assert res.exit_code == 1 and "index.html" in res.output
    assert page.read_text() == "<html>mine</html>"


def _foreground_sigint() -> None:
    """The fit runs as a user's foreground command does: with the default SIGINT action. A suite
    started in the background (``pytest &`` without job control, as some CI launchers do) ignores
    SIGINT, and a child inherits that, so without this the test would measure the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("chains", [1, 2], ids=["in-process", "worker-processes"])
def test_ctrl_c_stops_a_fit_within_seconds_and_leaves_no_folder(small_fit, tmp_path, chains):
    out = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "carnk_pkpd.cli", "fit", str(small_fit.path / "data.csv"), "--out", str(out),
           "--draws", "5000", "--tune", "5000", "--chains", str(chains)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_foreground_sigint)  # fmt: skip
    try:
        for line in proc.stdout:  # progress lines (not a terminal): wait until the sampler reports
            if "iteration" in line:
                break
        else:
            pytest.fail(f"the fit ended before sampling: {proc.stderr.read()}")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert elapsed < 15
    assert "Interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
