"""Reading valid cohorts: what the Cohort holds, the leniencies of the format, warnings, views."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from data_fixtures import (
    BASE_ROWS,
    HEADER,
    N_RECORDS,
    csv_text,
    rows_copy,
    with_cell,
    with_cells,
    with_extra_column,
    with_subject,
    without_column,
    write,
)

from carnk_pkpd.data import (
    STANDARD_COLUMNS,
    Cohort,
    CohortWarning,
    embedded_cohort_path,
    read_cohort,
    render_summary,
)
from carnk_pkpd.errors import DataError


def read_quietly(path):
    """Read a file that must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_cohort(path)


@pytest.fixture
def base(tmp_path) -> Cohort:
    return read_quietly(write(tmp_path, csv_text()))


# -- what a valid file gives --------------------------------------------------------------------------


def test_valid_file_gives_subjects_in_file_order(base):
    assert base.ids == ["1", "2"]
    assert [s.dl for s in base.subjects] == ["4", "1"]
    assert base.dose_levels == ["1", "4"]
    assert base.covariate_names == ("AGE", "SEX", "WT")
    assert base.subject(1).covariates == {"AGE": 38.0, "SEX": 1.0, "WT": 58.0}


def test_infusions_and_lymphodepletion_markers_per_subject(base):
    s1, s2 = base.subjects
    assert s1.doses == [(0.0, 3.0), (3.0, 3.0)]
    assert s2.doses == [(0.0, 0.75)]
    assert s1.ld_times == [-5.0]
    assert s2.ld_times == [-5.0]


def test_observations_are_the_evid0_mdv0_rows_with_blq_dv_at_lloq(base):
    obs = base.subject("2").observations
    assert list(obs.columns) == ["TIME", "DVID", "DV", "BLQ", "LLOQ"]
    assert obs["TIME"].tolist() == [2.0, 14.0, 14.0, 180.0]  # the MDV=1 sample at day 30 is not one
    assert obs["DVID"].tolist() == [1, 1, 2, 10]
    assert obs["BLQ"].tolist() == [0, 1, 0, 0]
    assert obs.loc[1, "DV"] == obs.loc[1, "LLOQ"] == 0.1


def test_blq_observation_may_leave_dv_missing_and_gets_lloq(tmp_path):
    cohort = read_quietly(write(tmp_path, with_cell(9, "DV", ".")))
    obs = cohort.subject("1").observations
    assert obs.loc[obs["TIME"] == 28, "DV"].tolist() == [1.0]
    assert math.isnan(cohort.to_dataframe().loc[7, "DV"])  # the record keeps what the file says


def test_to_dataframe_keeps_every_record_in_file_order(base):
    df = base.to_dataframe()
    assert list(df.columns) == [*STANDARD_COLUMNS, "AGE", "SEX", "WT"]
    assert len(df) == N_RECORDS
    assert df["ID"].tolist() == [r[0] for r in BASE_ROWS]
    assert df["TIME"].tolist() == [float(r[1]) for r in BASE_ROWS]
    assert df["EVID"].tolist() == [int(r[2]) for r in BASE_ROWS]
    assert df["DVID"].tolist()[10:12] == [0, 0]  # DVID "." on dose rows reads as 0
    assert df["MDV"].tolist()[15] == 1  # the missed sample is kept
    assert df["EVID"].dtype == np.int64 and df["TIME"].dtype == np.float64


def test_to_dataframe_is_a_copy(base):
    df = base.to_dataframe()
    df.loc[0, "TIME"] = 999.0
    assert base.to_dataframe().loc[0, "TIME"] == -5.0


def test_comments_and_synthetic_flag(tmp_path):
    path = write(tmp_path, csv_text(comments=["SYNTHETIC: made up for a test", "seed 1"]))
    cohort = read_quietly(path)
    assert cohort.comments == ("SYNTHETIC: made up for a test", "seed 1")
    assert cohort.synthetic is True
    assert cohort.summary().synthetic is True
    assert read_quietly(write(tmp_path, csv_text(comments=["trial data"]), "real.csv")).synthetic is False


# -- leniencies ---------------------------------------------------------------------------------------


def test_headers_are_case_insensitive(tmp_path, base):
    lower = csv_text(header=[h.lower() for h in HEADER])
    assert read_quietly(write(tmp_path, lower, "lower.csv")) == base


def test_dot_and_empty_cells_are_both_missing(tmp_path, base):
    rows = [["" if c == "." else c for c in r] for r in BASE_ROWS]
    assert read_quietly(write(tmp_path, csv_text(rows), "empty.csv")) == base


@pytest.mark.parametrize(
    ("variant", "make"),
    [
        ("semicolon", lambda: csv_text(sep=";")),
        ("tab", lambda: csv_text(sep="\t")),
        ("CRLF", lambda: csv_text(newline="\r\n")),
        ("CR", lambda: csv_text(newline="\r")),
        ("BOM", lambda: "\ufeff" + csv_text()),
        ("BOM-semicolon-CRLF", lambda: "\ufeff" + csv_text(sep=";", newline="\r\n")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_separators_line_ends_and_bom_read_identically(tmp_path, base, variant, make):
    assert read_quietly(write(tmp_path, make(), f"{variant}.csv")) == base


def test_semicolon_file_may_use_decimal_commas(tmp_path, base):
    text = csv_text(sep=";").replace("96.1", "96,1").replace("0.75", "0,75")
    assert read_quietly(write(tmp_path, text, "eu.csv")) == base


def test_decimal_comma_in_a_comma_file_is_a_column_shift_not_a_number(tmp_path):
    with pytest.raises(DataError, match="too many cells"):
        read_cohort(write(tmp_path, with_cell(3, "DV", '"96,1"').replace('"96,1"', "96,1")))


def test_string_ids_and_integral_float_ids(tmp_path):
    rows = rows_copy()
    for r in rows:
        r[0] = {"1": "PT-001", "2": "2.0"}[r[0]]
    cohort = read_quietly(write(tmp_path, csv_text(rows)))
    assert cohort.ids == ["PT-001", "2"]


def _without_lloq_and_blq_zero() -> str:
    rows = rows_copy()
    for r in rows:
        r[HEADER.index("BLQ")] = "0"
    k = HEADER.index("LLOQ")
    return csv_text([r[:k] + r[k + 1 :] for r in rows], HEADER[:k] + HEADER[k + 1 :])


@pytest.mark.parametrize("column", ["MDV", "BLQ", "LLOQ"])
def test_optional_columns_may_be_absent(tmp_path, column):
    text = _without_lloq_and_blq_zero() if column == "LLOQ" else without_column(column)
    cohort = read_quietly(write(tmp_path, text))
    df = cohort.to_dataframe()
    assert list(df.columns[:10]) == list(STANDARD_COLUMNS)
    if column == "MDV":  # derived: 1 on dose/EVID=2 rows and on observations without DV
        assert df["MDV"].tolist() == [int(r[6]) for r in BASE_ROWS]
    if column == "BLQ":
        assert set(df["BLQ"]) == {0}
    if column == "LLOQ":
        assert df["LLOQ"].isna().all()


def test_blq_rows_need_an_lloq_column(tmp_path):
    with pytest.raises(DataError) as info:
        read_cohort(write(tmp_path, without_column("LLOQ")))
    assert [(p.row, p.column) for p in info.value.problems] == [(9, "LLOQ"), (15, "LLOQ")]
    assert "found no LLOQ column" in info.value.problems[0].message


def test_blank_lines_and_separator_only_lines_are_skipped(tmp_path, base):
    lines = csv_text().splitlines()
    text = "\n".join([*lines[:5], "", ",,,,,,,,,,,,", *lines[5:], "", ""]) + "\n"
    assert read_quietly(write(tmp_path, text)) == base


def test_trailing_separators_in_header_and_rows_are_tolerated(tmp_path, base):
    text = "\n".join(line + ",," for line in csv_text().splitlines()) + "\n"
    assert read_quietly(write(tmp_path, text)) == base


def test_extra_constant_numeric_column_is_a_covariate(tmp_path):
    cohort = read_quietly(write(tmp_path, with_extra_column("crp0", "3.5")))
    assert cohort.covariate_names == ("AGE", "SEX", "WT", "CRP0")
    assert cohort.subject("1").covariates["CRP0"] == 3.5


def test_extra_varying_numeric_column_is_time_varying(tmp_path):
    cohort = read_quietly(write(tmp_path, with_extra_column("CRP", [str(i) for i in range(N_RECORDS)])))
    assert cohort.time_varying == ("CRP",)
    assert "CRP" not in cohort.subject("1").covariates
    assert cohort.to_dataframe()["CRP"].tolist() == [float(i) for i in range(N_RECORDS)]


def test_text_only_extra_column_is_ignored_with_a_warning(tmp_path):
    with pytest.warns(CohortWarning, match=r"cohort\.csv: column SITE holds text"):
        cohort = read_cohort(write(tmp_path, with_extra_column("SITE", "Erlangen")))
    assert "SITE" not in cohort.to_dataframe().columns


def test_amt_on_evid2_rows_and_dv_on_dose_rows_are_ignored(tmp_path):
    text = with_cell(2, "AMT", "5").replace("\n1,0,1,3,1,.,", "\n1,0,1,3,1,0,")
    cohort = read_quietly(write(tmp_path, text))
    assert cohort.subject("1").doses == [(0.0, 3.0), (3.0, 3.0)]


def test_sledai_score_is_an_observation(tmp_path):
    cohort = read_quietly(write(tmp_path, with_cells(10, DVID="12", DV="14")))
    obs = cohort.subject("1").observations
    assert obs.loc[obs["DVID"] == 12, "DV"].tolist() == [14.0]


def test_missing_covariate_cells_are_allowed_within_a_subject(tmp_path):
    rows = rows_copy()
    for r in rows[1:10]:
        r[HEADER.index("WT")] = "."
    cohort = read_quietly(write(tmp_path, csv_text(rows)))
    assert cohort.subject("1").covariates["WT"] == 58.0


# -- warnings: what a user may intend -------------------------------------------------------------------


def test_valid_base_file_does_not_warn(base):
    assert len(base.subjects) == 2  # read_quietly turned warnings into errors


def test_subject_with_infusions_but_no_observations_warns(tmp_path):
    text = with_subject([["3", "-5", "2", ".", ".", ".", "1", "0", ".", "2", "50", "1", "60"],
                         ["3", "0", "1", "1.5", ".", ".", "1", "0", ".", "2", "50", "1", "60"]])  # fmt: skip
    path = write(tmp_path, text)
    with pytest.warns(CohortWarning, match=rf"^{path}: subject 3 has infusions but no observations yet$"):
        cohort = read_cohort(path)
    assert cohort.ids == ["1", "2", "3"]


def test_infused_subject_without_lymphodepletion_rows_warns(tmp_path):
    # an infusion and a B-cell sample but no EVID=2 row: the subject is modelled without LD, and says so
    text = with_subject([["3", "0", "1", "1.5", ".", ".", "1", "0", ".", "2", "50", "1", "60"],
                         ["3", "7", "0", ".", "2", "150", "0", "0", "1", "2", "50", "1", "60"]])  # fmt: skip
    with pytest.warns(CohortWarning, match=r"subject 3 has no lymphodepletion record \(EVID=2\)"):
        read_cohort(write(tmp_path, text))


def test_subject_without_infusions_warns(tmp_path):
    text = with_subject([["3", "-2", "0", "0", "2", "150", "0", "0", "1", "2", "50", "1", "60"]])
    with pytest.warns(CohortWarning, match="subject 3 has no CAR-NK infusion"):
        read_cohort(write(tmp_path, text))


def test_car_nk_observation_before_the_first_infusion_warns(tmp_path):
    rows = rows_copy()
    rows.insert(2, ["1", "-1", "0", "0", "1", "0.3", "0", "0", "0.1", "4", "38", "1", "58"])  # row 4
    with pytest.warns(
        CohortWarning, match=r"subject 1 has 1 CAR-NK observation\(s\).*before its first infusion \(rows 4\)"
    ):
        read_cohort(write(tmp_path, csv_text(rows)))


def test_commented_out_record_is_skipped_with_a_warning(tmp_path, base):
    lines = csv_text().splitlines()
    text = "\n".join([*lines[:3], "#1,0.5,0,0,1,99,0,0,0.1,4,38,1,58", *lines[3:]]) + "\n"
    with pytest.warns(CohortWarning, match="row 4 starts with # and was skipped"):
        cohort = read_cohort(write(tmp_path, text))
    assert cohort == base


def test_no_warning_is_given_when_the_file_has_errors(tmp_path):
    text = with_subject([["3", "0", "1", "0", ".", ".", "1", "0", ".", "2", "50", "1", "60"]])  # AMT 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="positive AMT"):
            read_cohort(write(tmp_path, text))


# -- from_dataframe -------------------------------------------------------------------------------------


def test_from_dataframe_of_to_dataframe_is_equal(base):
    again = Cohort.from_dataframe(base.to_dataframe(), comments=base.comments)
    assert again == base
    assert again.subjects == base.subjects
    assert again.source is None


def test_from_dataframe_accepts_python_types_and_lowercase_names():
    df = pd.DataFrame(
        {
            "id": [7, 7, 7],
            "time": [-1, 0, 1.5],
            "evid": [0, 1, 0],
            "amt": [None, 2.0, None],
            "dvid": [2, None, 1],
            "dv": [120.0, None, 4.2],
            "dl": [3, 3, 3],
        }
    )
    cohort = Cohort.from_dataframe(df, comments=["# SYNTHETIC simulator output"])
    assert cohort.ids == ["7"]
    assert cohort.subject(7).dl == "3"
    assert cohort.synthetic and cohort.comments == ("SYNTHETIC simulator output",)
    assert cohort.to_dataframe()["MDV"].tolist() == [0, 1, 0]


def test_from_dataframe_reports_rows_as_write_cohort_would_number_them(base):
    df = base.to_dataframe()
    df.loc[3, "DV"] = -1.0
    with pytest.raises(DataError) as info:
        Cohort.from_dataframe(df, source="sim.csv", comments=["SYNTHETIC"])
    assert [str(p) for p in info.value.problems] == [
        "sim.csv:6:DV: negative DV (found -1, expected DV >= 0 in natural units, not log)"
    ]


def test_from_dataframe_rejects_infinite_values():
    df = pd.DataFrame({c: [0] for c in ("ID", "TIME", "EVID", "AMT", "DVID", "DV", "DL")})
    df["DV"] = [np.inf]
    df["DVID"] = [1]
    with pytest.raises(DataError, match=r"<dataframe>:2:DV: non-finite value"):
        Cohort.from_dataframe(df)


def test_unexpected_failure_becomes_a_data_error(tmp_path, monkeypatch):
    import carnk_pkpd.data as data

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(data, "_split_text", boom)
    with pytest.raises(DataError, match="internal error RuntimeError: simulated bug"):
        read_cohort(write(tmp_path, csv_text()))


# -- views ----------------------------------------------------------------------------------------------


def test_to_xarray_has_observations_and_subject_data_with_units(base):
    ds = base.to_xarray()
    assert ds.sizes["obs"] == 11 and ds.sizes["subject"] == 2 and ds.sizes["infusion"] == 3
    assert ds["subject"].values.tolist() == ["1", "2"]
    assert ds["dose_level"].values.tolist() == ["4", "1"]
    assert ds["WT"].values.tolist() == [58.0, 72.0]
    assert ds["WT"].attrs["units"] == "kg"
    assert ds["TIME"].attrs["units"] == "days"
    assert ds["AMT"].attrs["units"] == "10^9 cells"
    assert "cells/µL" in ds["DV"].attrs["units"]
    assert ds["ID"].values.tolist()[:7] == ["1"] * 7
    assert ds["subject_index"].values.tolist() == [0] * 7 + [1] * 4
    assert ds["DVID"].values.tolist()[:3] == [2, 1, 2]
    assert ds.sel(dvid=3)["dvid_unit"].item() == "copies/µg gDNA"
    assert ds.attrs["synthetic"] == 0


def test_summary_counts(base):
    s = base.summary()
    assert (s.n_subjects, s.n_records, s.n_observations) == (2, N_RECORDS, 11)
    assert s.subjects_per_dl == {"1": 1, "4": 1}
    assert s.infusion_amounts == {"1": (0.75,), "4": (3.0,)}
    assert s.observations_per_dvid == {1: 4, 2: 4, 10: 2, 11: 1}
    assert s.blq_fraction_per_dvid == {1: 0.25, 2: 0.25, 10: 0.0, 11: 0.0}
    assert s.follow_up == {"1": 180.0, "2": 180.0}
    assert s.synthetic is False


def test_summary_renders_as_text_with_rich(base):
    text = str(base.summary())
    assert "2 subjects" in text and "Observations per DVID" in text and "CAR-NK cells" in text
    assert "SYNTHETIC" not in text


def test_render_summary_prints_synthetic_banner(tmp_path):
    from rich.console import Console

    cohort = read_quietly(write(tmp_path, csv_text(comments=["SYNTHETIC"])))
    console = Console(record=True, width=100)
    summary = render_summary(cohort, console)
    assert summary.synthetic
    out = console.export_text()
    assert "SYNTHETIC cohort: simulated numbers, not trial data" in out


def test_markup_in_ids_is_shown_literally(tmp_path):
    rows = rows_copy()
    for r in rows:
        r[0] = "[red]x" if r[0] == "1" else r[0]
    text = str(read_quietly(write(tmp_path, csv_text(rows))).summary())
    assert "[red]x" in text


# -- the embedded example ---------------------------------------------------------------------------------


def test_embedded_example_cohort():
    cohort = read_quietly(embedded_cohort_path())
    assert cohort.synthetic
    assert cohort.comments[0] == "SYNTHETIC example cohort: simulated numbers, not trial data"
    assert [s.dl for s in cohort.subjects] == ["1", "3", "4"]
    expected = {"1": (0.75, 7.0), "3": (2.0, 3.0), "4": (3.0, 3.0)}
    for s in cohort.subjects:
        amt, tau = expected[s.dl]
        assert s.doses == [(0.0, amt), (tau, amt), (2 * tau, amt)]
        assert s.ld_times and max(s.ld_times) < 0
        obs = s.observations
        for dvid, lloq in ((1, 0.1), (2, 1.0)):
            sel = obs[obs["DVID"] == dvid]
            assert len(sel) >= 12
            assert (sel["LLOQ"] == lloq).all()
            blq = sel[sel["BLQ"] == 1]
            assert len(blq) >= 1 and (blq["DV"] == lloq).all()
        assert obs.loc[obs["DVID"].isin([10, 11]), "TIME"].tolist() == [180.0, 180.0]


def test_unknown_embedded_cohort_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"no embedded cohort named 'nope' \(found: .*example"):
        embedded_cohort_path("nope")


def test_to_xarray_survives_a_netcdf_round_trip(base, tmp_path):
    pytest.importorskip("netCDF4")
    import xarray as xr

    ds = base.to_xarray()
    ds.to_netcdf(tmp_path / "cohort.nc", engine="netcdf4")
    with xr.open_dataset(tmp_path / "cohort.nc", engine="netcdf4") as back:
        assert back.load().identical(ds)  # no unit is mistaken for a CF date ("… since …")
