"""A small valid cohort, built in code, and helpers that give it exactly one defect.

Row numbers are physical line numbers: the header is row 1, ``BASE_ROWS[0]`` is row 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

HEADER = ["ID", "TIME", "EVID", "AMT", "DVID", "DV", "MDV", "BLQ", "LLOQ", "DL", "AGE", "SEX", "WT"]

# fmt: off
BASE_ROWS = [
    # subject 1, DL 4: rows 2-11
    ["1", "-5",  "2", "0", "0",  ".",    "1", "0", ".",   "4", "38", "1", "58"],  # 2  lymphodepletion
    ["1", "-2",  "0", "0", "2",  "96.1", "0", "0", "1",   "4", "38", "1", "58"],  # 3  baseline B cells
    ["1", "0",   "1", "3", "1",  ".",    "1", "0", ".",   "4", "38", "1", "58"],  # 4  infusion
    ["1", "1",   "0", "0", "1",  "21.4", "0", "0", "0.1", "4", "38", "1", "58"],  # 5  CAR-NK
    ["1", "1",   "0", "0", "2",  "3.2",  "0", "0", "1",   "4", "38", "1", "58"],  # 6  B cells
    ["1", "3",   "1", "3", "1",  ".",    "1", "0", ".",   "4", "38", "1", "58"],  # 7  infusion
    ["1", "7",   "0", "0", "1",  "5.5",  "0", "0", "0.1", "4", "38", "1", "58"],  # 8  CAR-NK
    ["1", "28",  "0", "0", "2",  "1",    "0", "1", "1",   "4", "38", "1", "58"],  # 9  B cells BLQ
    ["1", "180", "0", "0", "10", "1",    "0", "0", ".",   "4", "38", "1", "58"],  # 10 DORIS
    ["1", "180", "0", "0", "11", "1",    "0", "0", ".",   "4", "38", "1", "58"],  # 11 LLDAS
    # subject 2, DL 1: rows 12-18
    ["2", "-5",  "2", ".",    ".",  ".",   "1", "0", ".",   "1", "45", "0", "72"],  # 12 lymphodepletion
    ["2", "0",   "1", "0.75", ".",  ".",   "1", "0", ".",   "1", "45", "0", "72"],  # 13 infusion
    ["2", "2",   "0", "0",    "1",  "0.8", "0", "0", "0.1", "1", "45", "0", "72"],  # 14 CAR-NK
    ["2", "14",  "0", "0",    "1",  "0.1", "0", "1", "0.1", "1", "45", "0", "72"],  # 15 CAR-NK BLQ
    ["2", "14",  "0", "0",    "2",  "40",  "0", "0", "1",   "1", "45", "0", "72"],  # 16 B cells
    ["2", "30",  "0", "0",    "1",  ".",   "1", "0", ".",   "1", "45", "0", "72"],  # 17 missed sample
    ["2", "180", "0", "0",    "10", "0",   "0", "0", ".",   "1", "45", "0", "72"],  # 18 DORIS
]
# fmt: on

N_RECORDS = len(BASE_ROWS)


def rows_copy() -> list[list[str]]:
    """A fresh copy of the valid rows, safe to edit."""
    return [list(r) for r in BASE_ROWS]


def csv_text(
    rows: Sequence[Sequence[str]] | None = None,
    header: Sequence[str] | None = None,
    *,
    sep: str = ",",
    comments: Sequence[str] = (),
    newline: str = "\n",
) -> str:
    """The cohort as file text (default: the valid base cohort)."""
    rows = BASE_ROWS if rows is None else rows
    header = HEADER if header is None else header
    lines = [f"# {c}" for c in comments] + [sep.join(header)] + [sep.join(r) for r in rows]
    return newline.join(lines) + newline


def write(folder: Path, content: str | bytes, name: str = "cohort.csv") -> Path:
    """Write text (UTF-8, newlines untouched) or bytes to ``folder/name``."""
    path = folder / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def with_cell(row: int, column: str, value: str) -> str:
    """The base cohort with one cell (physical ``row``, header name ``column``) replaced."""
    rows = rows_copy()
    rows[row - 2][HEADER.index(column)] = value
    return csv_text(rows)


def with_cells(row: int, **values: str) -> str:
    """The base cohort with several cells of physical ``row`` replaced (``DVID="12", DV="3"``)."""
    rows = rows_copy()
    for column, value in values.items():
        rows[row - 2][HEADER.index(column)] = value
    return csv_text(rows)


def without_column(column: str) -> str:
    """The base cohort without one column."""
    k = HEADER.index(column)
    header = [h for i, h in enumerate(HEADER) if i != k]
    rows = [[c for i, c in enumerate(r) if i != k] for r in BASE_ROWS]
    return csv_text(rows, header)


def with_row_moved_to_end(row: int) -> str:
    """The base cohort with physical ``row`` moved to the end of the file."""
    rows = rows_copy()
    moved = rows.pop(row - 2)
    return csv_text([*rows, moved])


def with_row_duplicated(row: int) -> str:
    """The base cohort with physical ``row`` repeated right after itself (the copy is ``row + 1``)."""
    rows = rows_copy()
    rows.insert(row - 1, list(rows[row - 2]))
    return csv_text(rows)


def with_row_cells(row: int, cells: Sequence[str]) -> str:
    """The base cohort with physical ``row`` given other cells (e.g. one too few)."""
    rows = rows_copy()
    rows[row - 2] = list(cells)
    return csv_text(rows)


def with_extra_column(name: str, values: Sequence[str] | str) -> str:
    """The base cohort with one more column (a single value is used on every row)."""
    if isinstance(values, str):
        values = [values] * N_RECORDS
    rows = [[*r, v] for r, v in zip(BASE_ROWS, values, strict=True)]
    return csv_text(rows, [*HEADER, name])


def with_subject(rows: Sequence[Sequence[str]]) -> str:
    """The base cohort with a third subject's rows appended."""
    return csv_text([*rows_copy(), *[list(r) for r in rows]])
