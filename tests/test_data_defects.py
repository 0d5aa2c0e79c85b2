"""Each defect class of the cohort format: a file with exactly one defect gives exactly one problem,
at the right row and column, with a message that says what is wrong and what was expected."""

from __future__ import annotations

import pytest
from data_fixtures import (
    BASE_ROWS,
    HEADER,
    csv_text,
    rows_copy,
    with_cell,
    with_cells,
    with_extra_column,
    with_row_cells,
    with_row_duplicated,
    with_row_moved_to_end,
    without_column,
    write,
)

from carnk_pkpd.data import read_cohort
from carnk_pkpd.errors import DataError


def only_problem(tmp_path, content):
    """Read ``content`` and return its single problem (fail if it reads, or if it has more)."""
    path = write(tmp_path, content)
    with pytest.raises(DataError) as info:
        read_cohort(path)
    problems = info.value.problems
    assert len(problems) == 1, "\n".join(str(p) for p in problems)
    assert problems[0].file == str(path)
    return problems[0]


# (file text, row, column, words the message must contain)
ROW_DEFECTS = [
    *[
        pytest.param(
            without_column(c), 1, c, ["required column missing", c], id=f"required-column-{c}-missing"
        )
        for c in ("ID", "TIME", "EVID", "AMT", "DVID", "DV", "DL")
    ],
    pytest.param(
        with_cell(5, "TIME", "abc"), 5, "TIME", ["not a number", "'abc'", "days"], id="text-in-TIME"
    ),
    pytest.param(
        with_cell(5, "DV", "NA"), 5, "DV", ["not a number", "'NA'", "write . or leave empty"], id="NA-in-DV"
    ),
    pytest.param(
        with_cell(5, "WT", "5O"), 5, "WT", ["not a number", "'5O'", "kg"], id="text-in-covariate-WT"
    ),
    pytest.param(with_cell(5, "DV", "inf"), 5, "DV", ["non-finite value", "'inf'"], id="infinite-DV"),
    pytest.param(with_cell(5, "LLOQ", "NaN"), 5, "LLOQ", ["non-finite value", "'NaN'"], id="nan-in-LLOQ"),
    pytest.param(with_cell(5, "AMT", "1e999"), 5, "AMT", ["non-finite value"], id="overflowing-AMT"),
    pytest.param(with_cell(5, "TIME", "."), 5, "TIME", ["TIME missing", "days"], id="TIME-missing"),
    pytest.param(with_cell(5, "ID", "."), 5, "ID", ["ID missing", "subject identifier"], id="ID-missing"),
    pytest.param(with_cell(5, "DL", ""), 5, "DL", ["DL missing", "dose-level label"], id="DL-missing"),
    pytest.param(
        with_cell(8, "TIME", "2"),
        8,
        "TIME",
        ["TIME decreases within subject 1", "found 2", ">= 3 as on row 7"],
        id="TIME-decreasing",
    ),
    pytest.param(
        with_row_moved_to_end(11),
        18,
        "ID",
        ["rows of subject 1 are not contiguous", "after subject 2", "earlier rows end at row 10"],
        id="subject-not-contiguous",
    ),
    pytest.param(
        with_cell(4, "AMT", "."), 4, "AMT", ["EVID=1", "positive AMT", "found ."], id="dose-AMT-missing"
    ),
    pytest.param(
        with_cell(4, "AMT", "0"), 4, "AMT", ["EVID=1", "positive AMT", "found 0"], id="dose-AMT-zero"
    ),
    pytest.param(
        with_cell(4, "AMT", "-3"), 4, "AMT", ["EVID=1", "positive AMT", "found -3"], id="dose-AMT-negative"
    ),
    pytest.param(
        with_cell(5, "AMT", "3"),
        5,
        "AMT",
        ["AMT on an observation row", "0 or missing"],
        id="AMT-on-observation",
    ),
    pytest.param(
        with_cell(5, "DV", "."),
        5,
        "DV",
        ["observation without DV", "MDV=1 for a missing sample"],
        id="observation-without-DV",
    ),
    pytest.param(
        with_cell(5, "DV", "-21.4"), 5, "DV", ["negative DV", "found -21.4", "not log"], id="negative-DV"
    ),
    pytest.param(
        with_cell(5, "EVID", "3"), 5, "EVID", ["unknown EVID", "found 3", "one of 0, 1, 2"], id="unknown-EVID"
    ),
    pytest.param(with_cell(5, "EVID", "."), 5, "EVID", ["EVID missing", "one of 0, 1, 2"], id="EVID-missing"),
    pytest.param(
        with_cell(5, "DVID", "7"),
        5,
        "DVID",
        ["unknown DVID", "found 7", "one of 1, 2, 3, 10, 11, 12"],
        id="unknown-DVID-on-observation",
    ),
    pytest.param(
        with_cell(5, "DVID", "0"),
        5,
        "DVID",
        ["DVID missing on an observation row", "found 0"],
        id="DVID-0-on-observation",
    ),
    pytest.param(
        with_cell(5, "DVID", "."),
        5,
        "DVID",
        ["DVID missing on an observation row", "found ."],
        id="DVID-missing-on-observation",
    ),
    pytest.param(
        with_cell(4, "DVID", "5"),
        4,
        "DVID",
        ["unknown DVID", "found 5", "0 or missing on dose, EVID=2 and MDV=1 rows"],
        id="unknown-DVID-on-dose",
    ),
    pytest.param(
        with_cell(10, "DV", "2"),
        10,
        "DV",
        ["DORIS remission (DVID 10) must be 0 or 1", "found 2"],
        id="DORIS-not-0-or-1",
    ),
    pytest.param(
        with_cell(11, "DV", "0.5"),
        11,
        "DV",
        ["LLDAS (DVID 11) must be 0 or 1", "found 0.5"],
        id="LLDAS-not-0-or-1",
    ),
    pytest.param(
        with_cells(10, DVID="12", DV="110"),
        10,
        "DV",
        ["SLEDAI-2K score out of range", "found 110", "0 to 105"],
        id="SLEDAI-out-of-range",
    ),
    pytest.param(
        with_cell(9, "LLOQ", "."),
        9,
        "LLOQ",
        ["BLQ=1 without a positive LLOQ", "found ."],
        id="BLQ-without-LLOQ",
    ),
    pytest.param(
        with_cell(9, "LLOQ", "0"),
        9,
        "LLOQ",
        ["BLQ=1 without a positive LLOQ", "found 0"],
        id="BLQ-with-zero-LLOQ",
    ),
    pytest.param(
        with_cell(9, "DV", "5"),
        9,
        "DV",
        ["BLQ=1 but DV above LLOQ", "found DV 5", "LLOQ 1"],
        id="BLQ-DV-above-LLOQ",
    ),
    pytest.param(
        with_cell(5, "LLOQ", "-0.1"), 5, "LLOQ", ["negative LLOQ", "found -0.1"], id="negative-LLOQ"
    ),
    pytest.param(
        with_cell(5, "BLQ", "2"), 5, "BLQ", ["invalid BLQ", "found 2", "0 or 1"], id="BLQ-not-0-or-1"
    ),
    pytest.param(
        with_cell(5, "MDV", "3"), 5, "MDV", ["invalid MDV", "found 3", "0 or 1"], id="MDV-not-0-or-1"
    ),
    pytest.param(
        with_cell(6, "DL", "3"),
        6,
        "DL",
        ["DL changes within subject 1", "found 3", "expected 4 as on row 2"],
        id="DL-changes-within-subject",
    ),
    pytest.param(
        with_cell(6, "WT", "60"),
        6,
        "WT",
        ["WT changes within subject 1", "found 60", "expected 58 as on row 2"],
        id="covariate-changes-within-subject",
    ),
    pytest.param(
        with_row_duplicated(5),
        6,
        None,
        ["duplicate record", "same values as row 5"],
        id="exact-duplicate-row",
    ),
    pytest.param(
        with_row_cells(5, BASE_ROWS[3][:-1]),
        5,
        None,
        ["too few cells", "found 12", "expected 13"],
        id="row-too-short",
    ),
    pytest.param(
        with_row_cells(5, [*BASE_ROWS[3], "9"]),
        5,
        None,
        ["too many cells", "found 14", "expected 13"],
        id="row-too-long",
    ),
    pytest.param(
        with_row_cells(5, [";".join(BASE_ROWS[3])]),
        5,
        None,
        ["too few cells", "semicolon-separated, unlike the header"],
        id="row-with-other-separator",
    ),
    pytest.param(
        with_row_cells(5, [*BASE_ROWS[3][:5], '"21.4'] + BASE_ROWS[3][6:]),
        5,
        None,
        ["malformed quoting"],
        id="bad-quoting",
    ),
    pytest.param(
        with_extra_column("wt", "58"),
        1,
        "WT",
        ["duplicate column", "columns 13 and 14"],
        id="duplicate-column",
    ),
]


@pytest.mark.parametrize(("content", "row", "column", "words"), ROW_DEFECTS)
def test_one_defect_gives_one_problem_at_its_row_and_column(tmp_path, content, row, column, words):
    problem = only_problem(tmp_path, content)
    assert (problem.row, problem.column) == (row, column)
    for w in words:
        assert w in problem.message
    assert "(found" in problem.message and "expected" in problem.message


FILE_DEFECTS = [
    pytest.param(b"", ["empty file", "expected a header"], id="empty-file"),
    pytest.param(b"\n\n  \n", ["empty file"], id="blank-lines-only"),
    pytest.param(b"# SYNTHETIC: nothing else\n", ["empty file"], id="comments-only"),
    pytest.param((",".join(HEADER) + "\n").encode(), ["no data rows", "only the header"], id="header-only"),
    pytest.param(
        csv_text().encode()[:50] + b"\x00\x01\x02" + csv_text().encode()[50:],
        ["binary content", "NUL byte"],
        id="NUL-bytes",
    ),
    pytest.param(
        b"# made by caf\xe9 lab\n" + csv_text().encode(),
        ["not valid UTF-8", "0xe9", "line 1"],
        id="latin-1-text",
    ),
    pytest.param(csv_text().encode("utf-16"), ["UTF-16", "expected UTF-8"], id="utf-16-text"),
]


@pytest.mark.parametrize(("content", "words"), FILE_DEFECTS)
def test_unreadable_file_gives_one_file_level_problem(tmp_path, content, words):
    problem = only_problem(tmp_path, content)
    assert (problem.row, problem.column) == (None, None)
    for w in words:
        assert w in problem.message


def test_ambiguous_separator_is_reported_on_the_header(tmp_path):
    header = ",".join(HEADER[:5]) + ";" + ";".join(HEADER[5:])
    problem = only_problem(tmp_path, header + "\n" + "\n".join(",".join(r) for r in BASE_ROWS) + "\n")
    assert (problem.row, problem.column) == (1, None)
    assert "ambiguous column separator" in problem.message
    assert "commas and semicolons" in problem.message


def test_header_without_separator_is_reported(tmp_path):
    problem = only_problem(tmp_path, "ID TIME EVID AMT DVID DV DL\n1 0 1 3 1 . 4\n")
    assert (problem.row, problem.column) == (1, None)
    assert "no column separator" in problem.message


def test_missing_path_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError) as info:
        read_cohort(path)
    assert (
        str(info.value) == f"{path}: file not found (found nothing at this path, expected a cohort CSV file)"
    )


def test_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_cohort(tmp_path)


def test_comment_lines_shift_row_numbers(tmp_path):
    rows = rows_copy()
    rows[3][HEADER.index("DV")] = "-1"  # row 5 without comments
    problem = only_problem(tmp_path, csv_text(rows, comments=["SYNTHETIC test", "second line"]))
    assert (problem.row, problem.column) == (7, "DV")


def test_every_problem_is_listed_one_per_line_in_row_order(tmp_path):
    rows = rows_copy()
    rows[14][HEADER.index("LLOQ")] = "."  # row 16: fine (BLQ=0)
    rows[6][HEADER.index("TIME")] = "x"  # row 8
    rows[2][HEADER.index("AMT")] = "0"  # row 4
    rows[15][HEADER.index("EVID")] = "4"  # row 17
    path = write(tmp_path, csv_text(rows))
    with pytest.raises(DataError) as info:
        read_cohort(path)
    problems = info.value.problems
    assert [(p.row, p.column) for p in problems] == [(4, "AMT"), (8, "TIME"), (17, "EVID")]
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{path}:4:AMT: EVID=1 infusion without a positive AMT (found 0, expected")
    assert lines[1].startswith(f"{path}:8:TIME: not a number (found 'x', expected")
    assert lines[2].startswith(f"{path}:17:EVID: unknown EVID (found 4, expected one of 0, 1, 2")


def test_repeated_covariate_change_is_reported_once_per_value(tmp_path):
    rows = rows_copy()
    for r in rows[4:10]:  # rows 6-11 of subject 1
        r[HEADER.index("WT")] = "60"
    path = write(tmp_path, csv_text(rows))
    with pytest.raises(DataError) as info:
        read_cohort(path)
    assert [(p.row, p.column) for p in info.value.problems] == [(6, "WT")]


def test_a_typo_in_time_gives_one_problem_not_one_per_later_row(tmp_path):
    # row 7 TIME 300 instead of 3: only row 8 (TIME 7 after 300) decreases
    problem = only_problem(tmp_path, with_cell(7, "TIME", "300"))
    assert (problem.row, problem.column) == (8, "TIME")
