"""One error contract for the command line (exit 0 success, 1 bad input, 2 usage) and the Python API's
ergonomics (Regimen from a tuple or mapping, save_fit at the top level, dir() lists the public API,
a warning when the BSV cannot be identified)."""

from __future__ import annotations

import warnings

import pytest
from typer.testing import CliRunner

from carnk_pkpd.cli import app


def _err(res) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["doses", "FIT", "--w-remission", "-5"], "--w-remission"),
        (["doses", "FIT", "--w-safety", "-1"], "--w-safety"),
        (["doses", "FIT", "--w-cells", "nan"], "--w-cells"),
        (["doses", "FIT", "--da-target", "-5"], "--da-target"),
        (["doses", "FIT", "--da-target", "0"], "--da-target"),
        (["doses", "FIT", "--cmax-threshold", "0"], "--cmax-threshold"),
        (["predict", "FIT", "--visits", "2000"], "--visits"),
        (["predict", "FIT", "--visits", "-1"], "--visits"),
        (["predict", "FIT", "--dose", "-2"], "dose"),
        (["export", "FIT", "--format", "xlsx"], "--format"),
        (["doses", "FIT", "--draws", "0"], "--draws"),
    ],
)
def test_out_of_range_options_are_usage_errors(small_fit, args, option):
    args = [str(small_fit.path) if a == "FIT" else a for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert option in _err(res)


@pytest.mark.parametrize("command", ["predict", "doses", "export", "report"])
def test_a_missing_fit_folder_is_bad_input_for_every_command(tmp_path, command):
    res = CliRunner().invoke(app, [command, str(tmp_path / "nowhere")])
    assert res.exit_code == 1, res.output
    assert "nowhere" in _err(res) and "not a fit folder" in res.output


@pytest.mark.parametrize("command", ["simulate", "fit"])
def test_an_unknown_model_is_bad_input_for_every_command(tmp_path, command):
    from carnk_pkpd.data import embedded_cohort_path

    args = {"simulate": ["simulate", "--out", str(tmp_path / "c.csv")],
            "fit": ["fit", str(embedded_cohort_path("example")), "--out", str(tmp_path / "f")]}[command]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--model", "no_such_model"])
    assert res.exit_code == 1, res.output
    assert "no_such_model" in _err(res) and "reference" in res.output


def test_predict_creates_its_output_folder_like_export_and_report(small_fit, tmp_path):
    out = tmp_path / "new" / "folder"
    res = CliRunner().invoke(app, ["predict", str(small_fit.path), "--dose", "2", "--visits", "180",
                                   "--patients", "2", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "remission.csv").read_text(encoding="utf-8").startswith("# SYNTHETIC")


def test_grid_pointing_at_a_folder_names_it(small_fit, tmp_path):
    res = CliRunner().invoke(app, ["doses", str(small_fit.path), "--grid", str(tmp_path), "--workers", "0",
                                   "--out", str(tmp_path / "d")])  # fmt: skip
    assert res.exit_code == 1 and str(tmp_path) in _err(res)


def test_summary_table_keeps_parameter_names_whole_at_80_columns(small_fit):
    from rich.console import Console

    from carnk_pkpd.cli import _print_summary

    console = Console(width=80, record=True, force_terminal=False)
    _print_summary(small_fit, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in small_fit.summary()["name"]:
        assert name in text, name  # omega_/sigma_ names are never cut


def test_cohort_warnings_print_as_one_table(tmp_path):
    import contextlib
    import io

    from carnk_pkpd.cli import _warnings_table
    from carnk_pkpd.data import CohortWarning

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        with _warnings_table("Warnings"):
            for i in range(12):
                warnings.warn(f"cohort.csv: subject {i}: note", CohortWarning, stacklevel=1)
            warnings.warn("old api", DeprecationWarning, stacklevel=1)
    out = buf.getvalue()
    assert "Warnings (12)" in out and "subject 0" in out and "4 more" in out
    assert "old api" not in out and "warnings.warn" not in out


# --- Python API -----------------------------------------------------------------------------------------------
def test_regimen_from_tuple_or_mapping():
    from carnk_pkpd.regimen import Regimen

    assert Regimen.coerce((2.0, 3.0, 3)) == Regimen(2.0, 3.0, 3)
    assert Regimen.coerce([2, 3, 3, 0.5]) == Regimen(2.0, 3.0, 3, 0.5)
    assert Regimen.coerce({"dose": 2, "interval": 3, "n_infusions": 3}) == Regimen(2.0, 3.0, 3)
    for bad, match in (((1, 2), "regimen"), ({"dose": 1}, "missing"), ({"dose": 1, "interval": 3,
                       "n_infusions": 3, "x": 1}, "unknown"), (("a", 3, 3), "dose")):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=match):
            Regimen.coerce(bad)


def test_predict_remission_accepts_a_tuple(small_fit):
    from carnk_pkpd import predict_remission

    ds = predict_remission(small_fit, (2.0, 3.0, 3), visits=(180,), n_patients=2, n_draws=4)
    assert float(ds.attrs["dose"]) == 2.0 and "p_population" in ds


def test_top_level_api_lists_lazy_names():
    import carnk_pkpd

    names = dir(carnk_pkpd)
    for name in ("save_fit", "load_fit", "fit", "predict_remission", "read_cohort", "load_model", "Regimen"):
        assert name in names and name in carnk_pkpd.__all__
        assert callable(getattr(carnk_pkpd, name))


def test_too_few_subjects_per_omega_warns():
    from carnk_pkpd.errors import IdentifiabilityWarning, warn_bsv_identifiability

    with pytest.warns(IdentifiabilityWarning, match="not identifiable"):
        warn_bsv_identifiability(4, 1, "one.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_bsv_identifiability(4, 20, "twenty.csv")  # 5 per omega: no warning
        warn_bsv_identifiability(0, 1, "none.csv")
