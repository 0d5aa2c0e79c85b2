"""write_cohort writes the file format back: read -> write -> read gives an equal cohort."""

from __future__ import annotations

import os
import warnings

import pytest
from data_fixtures import HEADER, N_RECORDS, csv_text, rows_copy, with_extra_column, without_column, write

from carnk_pkpd.data import Cohort, embedded_cohort_path, read_cohort, write_cohort


def read_quietly(path) -> Cohort:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_cohort(path)


def round_trip(tmp_path, cohort: Cohort) -> Cohort:
    out = write_cohort(cohort, tmp_path / "written.csv")
    return read_quietly(out)


def _string_ids() -> str:
    rows = rows_copy()
    for r in rows:
        r[0] = {"1": '"PT,001 ""a"""', "2": "#2"}[r[0]]
    # "#2" is only read as an ID when it is not the first character of the line: quote it
    return csv_text(rows).replace("\n#2,", '\n"#2",')


VARIANTS = [
    pytest.param(csv_text(), id="comma"),
    pytest.param(csv_text(sep=";"), id="semicolon"),
    pytest.param(csv_text(sep="\t"), id="tab"),
    pytest.param(csv_text(newline="\r\n"), id="CRLF"),
    pytest.param("\ufeff" + csv_text(newline="\r\n"), id="BOM-CRLF"),
    pytest.param(csv_text(comments=["SYNTHETIC: test", "", "#second"]), id="comments"),
    pytest.param(without_column("MDV"), id="no-MDV"),
    pytest.param(with_extra_column("CRP", [str(i / 3) for i in range(N_RECORDS)]), id="time-varying-column"),
    pytest.param(with_extra_column("BSA", "1.7300000000000002"), id="float-precision"),
    pytest.param(_string_ids(), id="string-ids-with-quotes-commas-hash"),
]


@pytest.mark.parametrize("text", VARIANTS)
def test_read_write_read_is_identical(tmp_path, text):
    first = read_quietly(write(tmp_path, text))
    again = round_trip(tmp_path, first)
    assert again == first
    assert again.to_dataframe().equals(first.to_dataframe())
    assert again.comments == first.comments
    assert again.subjects == first.subjects


def test_variants_give_the_same_cohort_as_the_comma_file(tmp_path):
    comma = read_quietly(write(tmp_path, csv_text(), "comma.csv"))
    for i, text in enumerate([csv_text(sep=";"), csv_text(sep="\t"), "\ufeff" + csv_text(newline="\r\n")]):
        assert read_quietly(write(tmp_path, text, f"v{i}.csv")) == comma


def test_embedded_example_round_trips(tmp_path):
    first = read_quietly(embedded_cohort_path())
    assert round_trip(tmp_path, first) == first


def test_written_file_is_the_plain_format(tmp_path):
    cohort = read_quietly(write(tmp_path, csv_text(comments=["SYNTHETIC test"])))
    text = write_cohort(cohort, tmp_path / "out.csv").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# SYNTHETIC test"
    assert lines[1] == ",".join(HEADER)
    assert lines[2] == "1,-5,2,0,0,.,1,0,.,4,38,1,58"
    assert lines[13] == "2,0,1,0.75,0,.,1,0,.,1,45,0,72"  # DVID "." on a dose row is written 0
    assert text.endswith("\n") and "\r" not in text


def test_from_dataframe_then_write_then_read(tmp_path):
    first = read_quietly(write(tmp_path, csv_text()))
    built = Cohort.from_dataframe(first.to_dataframe(), comments=["SYNTHETIC simulated"])
    again = read_quietly(write_cohort(built, tmp_path / "sim.csv"))
    assert again == built
    assert again.synthetic


def test_write_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    cohort = read_quietly(write(tmp_path, csv_text(), "in.csv"))
    target = tmp_path / "out.csv"
    target.write_text("old contents")
    os.chmod(target, 0o640)
    assert write_cohort(cohort, target) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]
    assert target.stat().st_mode & 0o777 == 0o640
    assert read_quietly(target) == cohort


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    cohort = read_quietly(write(tmp_path, csv_text(), "in.csv"))
    target = tmp_path / "out.csv"
    target.write_text("old contents")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_cohort(cohort, target)
    assert target.read_text() == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]


def test_quoted_text_ids_are_read_and_written_back(tmp_path):
    first = read_quietly(write(tmp_path, _string_ids()))
    assert first.ids == ['PT,001 "a"', "#2"]
    assert round_trip(tmp_path, first).ids == first.ids
