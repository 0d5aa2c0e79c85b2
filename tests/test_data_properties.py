"""Property-based: whatever bytes a cohort file holds, reading it gives a Cohort or a DataError, fast.

An internal error is also turned into a DataError, so the properties also check that no problem
message is the "internal error" fallback: every failure must be one the reader explains.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from data_fixtures import BASE_ROWS, HEADER, csv_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carnk_pkpd.data import Cohort, read_cohort, write_cohort
from carnk_pkpd.errors import DataError

SETTINGS = settings(
    max_examples=200,
    deadline=400,
    suppress_health_check=[HealthCheck.too_slow],
)
VALID = csv_text(comments=["SYNTHETIC property test"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder for the whole module (hypothesis reruns a test many times within one call)."""
    return tmp_path_factory.mktemp("properties")


def read_bytes_as_file(workdir: Path, data: bytes) -> Cohort | DataError:
    path = workdir / "cohort.csv"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_cohort(path)
        except DataError as exc:
            return exc


def assert_explained(result: Cohort | DataError) -> None:
    if isinstance(result, DataError):
        assert result.problems, "a DataError lists at least one problem"
        for p in result.problems:
            assert "internal error" not in p.message, str(p)
            assert p.file.endswith("cohort.csv")
            assert p.row is None or p.row >= 1


@SETTINGS
@given(data=st.binary(max_size=3000))
def test_random_bytes_give_a_cohort_or_a_data_error(workdir, data):
    assert_explained(read_bytes_as_file(workdir, data))


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list('ID,TIME;EVID\tAMT.DV#0123456789-e \n\r"')), max_size=600))
def test_csv_like_text_gives_a_cohort_or_a_data_error(workdir, text):
    assert_explained(read_bytes_as_file(workdir, text.encode("utf-8")))


cell_values = st.one_of(
    st.sampled_from(
        [".", "", "0", "1", "2", "-1", "3", "10", "nan", "inf", "x", '"', "#", ";", "1e400", "0.1"]
    ),
    st.text(max_size=6),
)


@st.composite
def mutated_valid_file(draw) -> str:
    """The valid file after one to three random edits of the kinds people make."""
    lines = VALID.split("\n")
    first_data = 2  # index of the first record line (after one comment and the header)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["delete-char", "replace-cell", "swap-rows", "duplicate-line", "drop-line"])
        )
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "delete-char" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + lines[i][j + 1 :]
        elif kind == "replace-cell":
            cells = lines[i].split(",")
            cells[draw(st.integers(0, len(cells) - 1))] = draw(cell_values)
            lines[i] = ",".join(cells)
        elif kind == "swap-rows":
            j = draw(st.integers(first_data, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "duplicate-line":
            lines.insert(i, lines[i])
        elif kind == "drop-line":
            del lines[i]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@SETTINGS
@given(text=mutated_valid_file())
def test_mutated_valid_file_gives_a_cohort_or_a_data_error(workdir, text):
    result = read_bytes_as_file(workdir, text.encode("utf-8"))
    assert_explained(result)
    if isinstance(result, Cohort):  # whatever is accepted also round-trips
        out = write_cohort(result, workdir / "written.csv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert read_cohort(out) == result


def test_the_unmutated_file_is_valid(workdir):
    result = read_bytes_as_file(workdir, VALID.encode())
    assert isinstance(result, Cohort)
    assert len(result.to_dataframe()) == len(BASE_ROWS)
    assert list(result.to_dataframe().columns[-3:]) == HEADER[-3:]
