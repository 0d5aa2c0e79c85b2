"""Cohort files: read, check, hold and write the NONMEM-style long CSV described in ``data-format.md``.

One row per event (``ID TIME EVID AMT DVID DV MDV BLQ LLOQ DL`` plus optional covariates). The reader
checks the whole file and raises one :class:`~carnk_pkpd.errors.DataError` that lists *every* problem
as ``FILE:ROW:COLUMN: what is wrong (found …, expected …)``; rows are physical line numbers (the
header is row 1 when the file has no leading ``#`` comment lines). What a user may intend (a subject
without infusions, infusions without observations yet, CAR-NK samples before the first infusion) is a
:class:`CohortWarning`, not an error.

Leniency, chosen the way a pharmacometrician would expect:

* headers are case-insensitive; ``.`` or an empty cell is missing; a UTF-8 BOM and CRLF/CR line ends
  are accepted; the separator (comma, semicolon or tab) is sniffed from the header line, and a
  semicolon or tab file may use decimal commas (``1,5``);
* ``MDV``, ``BLQ`` and ``LLOQ`` may be absent: ``MDV`` then is 1 on dose and EVID=2 rows and on
  observation rows without ``DV`` (0 otherwise), ``BLQ`` is 0 and ``LLOQ`` missing; a missing cell in a
  present ``MDV``/``BLQ`` column gets the same default;
* ``DVID`` missing is read as 0 ("no observation type"), allowed on dose, EVID=2 and MDV=1 rows;
* ``AMT`` on EVID=2 rows is ignored; ``DV`` on dose rows is ignored;
* a BLQ=1 observation may leave ``DV`` missing; in :attr:`Subject.observations` its ``DV`` holds the
  ``LLOQ`` (the censoring limit);
* ``ID`` and ``DL`` are text labels; ``1.0`` is read as ``1`` (spreadsheet exports);
* extra columns are covariates: AGE, SEX, WT, BSA, DISDUR and PRIORBIO must be numeric and constant
  within a subject (missing cells are allowed); another numeric column that is constant within every
  subject is a covariate too, one that varies is kept as a time-varying column; a column holding only
  text (SITE, ARM, a comment column) is ignored with a warning;
* blank lines and separator-only lines (``,,,,``) are skipped; a ``#`` line after the header is a
  commented-out record, skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from carnk_pkpd.errors import DataError, Problem

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    import xarray as xr
    from rich.console import Console, RenderableType

__all__ = [
    "DVIDS",
    "KNOWN_COVARIATES",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "STANDARD_COLUMNS",
    "Cohort",
    "CohortSummary",
    "CohortWarning",
    "Subject",
    "embedded_cohort_path",
    "read_cohort",
    "render_summary",
    "write_cohort",
]

#: The file's columns in the order :meth:`Cohort.to_dataframe` and :func:`write_cohort` use.
STANDARD_COLUMNS: tuple[str, ...] = ("ID", "TIME", "EVID", "AMT", "DVID", "DV", "MDV", "BLQ", "LLOQ", "DL")
#: Columns a file must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("ID", "TIME", "EVID", "AMT", "DVID", "DV", "DL")
#: Columns that may be absent (defaults: MDV derived from EVID and DV, BLQ 0, LLOQ missing).
OPTIONAL_COLUMNS: tuple[str, ...] = ("MDV", "BLQ", "LLOQ")
#: Per-subject covariates with their units; each must be numeric and constant within a subject.
KNOWN_COVARIATES: dict[str, str] = {
    "AGE": "years",
    "SEX": "0 male, 1 female",
    "WT": "kg",
    "BSA": "m²",
    "DISDUR": "years",  # disease duration (not "years since …": CF readers would decode a date)
    "PRIORBIO": "0/1 prior belimumab or telitacicept",
}
#: Observation types: DVID -> (what was observed, unit).
DVIDS: dict[int, tuple[str, str]] = {
    1: ("CAR-NK cells (flow)", "cells/µL"),
    2: ("CD19+ B cells (flow)", "cells/µL"),
    3: ("CAR transgene (qPCR)", "copies/µg gDNA"),
    10: ("DORIS remission", "0/1"),
    11: ("LLDAS", "0/1"),
    12: ("SLEDAI-2K", "score"),
}
EVIDS: tuple[int, ...] = (0, 1, 2)
_CAR_DVIDS = (1, 3)
_BINARY_DVIDS = (10, 11)
_SLEDAI_MAX = 105

_MISSING_TOKENS = frozenset({"", "."})
_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab"}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+(?:[eE][+-]?\d+)?")
_INTEGRAL_TEXT = re.compile(r"([+-]?\d+)\.0*")
_NONFINITE_WORDS = frozenset({"nan", "inf", "infinity"})
_ALLOWED_DVIDS_TEXT = ", ".join(str(d) for d in DVIDS)

_EXPECTED_NUMBER = {
    "TIME": "a time in days",
    "EVID": "one of 0, 1, 2",
    "AMT": "an amount in 10^9 cells",
    "DVID": f"one of {_ALLOWED_DVIDS_TEXT}",
    "DV": "a value in natural units",
    "MDV": "0 or 1",
    "BLQ": "0 or 1",
    "LLOQ": "a limit in the units of DV",
}


class CohortWarning(UserWarning):
    """Something in a cohort a user may intend but should know about; names the file and subject."""


# --------------------------------------------------------------------------------------------------
# The cohort objects
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Subject:
    """One subject of a cohort.

    Attributes
    ----------
    id : str
        Subject identifier (text; ``1.0`` in a file is read as ``1``).
    dl : str
        Dose-level label (text, e.g. ``"4"``).
    covariates : dict[str, float]
        Per-subject covariates (AGE years, SEX 0 male/1 female, WT kg, BSA m², DISDUR years,
        PRIORBIO 0/1, and other constant numeric columns); NaN when the subject has no value.
    doses : list[tuple[float, float]]
        CAR-NK infusions as (TIME in days, AMT in 10^9 cells), EVID=1 rows in file order.
    ld_times : list[float]
        Times (days) of EVID=2 rows (lymphodepletion or other event markers).
    observations : pandas.DataFrame
        EVID=0, MDV=0 rows with columns ``TIME`` (days), ``DVID``, ``DV`` (natural units; for BLQ=1
        rows the LLOQ), ``BLQ`` (0/1) and ``LLOQ`` (units of DV, NaN when none).
    """

    id: str
    dl: str
    covariates: dict[str, float]
    doses: list[tuple[float, float]]
    ld_times: list[float]
    observations: pd.DataFrame

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Subject):
            return NotImplemented
        same_covariates = self.covariates.keys() == other.covariates.keys() and all(
            _same_float(self.covariates[k], other.covariates[k]) for k in self.covariates
        )
        return (
            self.id == other.id
            and self.dl == other.dl
            and same_covariates
            and self.doses == other.doses
            and self.ld_times == other.ld_times
            and self.observations.equals(other.observations)
        )

    __hash__ = None  # type: ignore[assignment]


class Cohort:
    """A checked cohort: every record of the file, grouped by subject.

    Build one with :func:`read_cohort` or :meth:`Cohort.from_dataframe`; both check the data first.
    Two cohorts are equal when their records (:meth:`to_dataframe`) and comments are equal; the
    source path does not count.
    """

    __slots__ = ("_comments", "_covariate_names", "_records", "_source", "_subjects", "_time_varying")

    def __init__(
        self,
        records: pd.DataFrame,
        *,
        source: Path | None,
        comments: tuple[str, ...],
        covariate_names: tuple[str, ...],
        time_varying: tuple[str, ...],
    ) -> None:
        # Internal: ``records`` must already be checked (use read_cohort or from_dataframe).
        self._records = records
        self._source = source
        self._comments = comments
        self._covariate_names = covariate_names
        self._time_varying = time_varying
        self._subjects = tuple(_make_subjects(records, covariate_names))

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        source: str | os.PathLike[str] | None = None,
        comments: Iterable[str] = (),
    ) -> Cohort:
        """Check and build a cohort from an in-memory table with the file's columns.

        Parameters
        ----------
        df : pandas.DataFrame
            One row per record; column names case-insensitive; NaN, None or ``"."`` is missing.
        source : path-like, optional
            Where the data come from; used in problem messages (``<dataframe>`` when None).
        comments : iterable of str
            Provenance lines (without or with a leading ``#``); a line containing SYNTHETIC marks the
            cohort synthetic.

        Returns
        -------
        Cohort

        Raises
        ------
        DataError
            Listing every problem; rows are numbered as in the file :func:`write_cohort` would write
            (comment lines, then the header, then row ``i`` of ``df`` on line ``len(comments) + 2 + i``).
        """
        comments_t = _normalise_comments(comments)
        file = str(source) if source is not None else "<dataframe>"
        path = Path(source) if source is not None else None
        try:
            header_row = len(comments_t) + 1
            table = _Table(
                file=file,
                header_row=header_row,
                columns=[str(c).strip().upper() for c in df.columns],
                cells=df.to_numpy(dtype=object).tolist(),
                rows=list(range(header_row + 1, header_row + 1 + len(df))),
                comments=comments_t,
            )
            return _build(table, path)
        except DataError:
            raise
        except Exception as exc:  # a data problem never surfaces as a traceback
            raise DataError([_internal_problem(file, exc)]) from exc

    # -- attributes --------------------------------------------------------------------------------

    @property
    def source(self) -> Path | None:
        """The file the cohort was read from (None when built from a DataFrame without a source)."""
        return self._source

    @property
    def subjects(self) -> list[Subject]:
        """Subjects in file order."""
        return list(self._subjects)

    @property
    def comments(self) -> tuple[str, ...]:
        """Provenance comment lines (text after the leading ``#``)."""
        return self._comments

    @property
    def synthetic(self) -> bool:
        """True when any provenance comment says SYNTHETIC (case-insensitive)."""
        return any("SYNTHETIC" in c.upper() for c in self._comments)

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """Per-subject covariate columns, in file order."""
        return self._covariate_names

    @property
    def time_varying(self) -> tuple[str, ...]:
        """Extra numeric columns that vary within a subject (kept in the records only)."""
        return self._time_varying

    @property
    def ids(self) -> list[str]:
        """Subject identifiers in file order."""
        return [s.id for s in self._subjects]

    @property
    def dose_levels(self) -> list[str]:
        """Distinct dose-level labels, numeric labels in numeric order first."""
        return sorted({s.dl for s in self._subjects}, key=_label_sort_key)

    def subject(self, subject_id: str | int) -> Subject:
        """Return the subject with this identifier.

        Raises
        ------
        KeyError
            When no subject has this identifier.
        """
        wanted = _label_from_python(subject_id)
        for s in self._subjects:
            if s.id == wanted:
                return s
        raise KeyError(f"no subject {subject_id!r} in the cohort (found {', '.join(self.ids)})")

    # -- views -------------------------------------------------------------------------------------

    def to_dataframe(self) -> pd.DataFrame:
        """All records as a tidy table (a copy), one row per record in file order.

        Columns: ``ID TIME EVID AMT DVID DV MDV BLQ LLOQ DL`` then covariates and time-varying columns
        in file order. TIME in days, AMT in 10^9 cells, DV and LLOQ in natural units; ID and DL text;
        EVID, DVID (0 when none), MDV and BLQ integers; missing numbers are NaN.
        """
        return self._records.copy()

    def to_xarray(self) -> xr.Dataset:
        """Observations and per-subject data as an :class:`xarray.Dataset`.

        Dimensions: ``obs`` (EVID=0, MDV=0 records; coordinates ``ID``, ``TIME`` in days, ``DVID``,
        ``subject_index``; variables ``DV``, ``BLQ``, ``LLOQ``), ``subject`` (indexed by ID; variables
        ``dose_level`` and one per covariate), ``infusion`` (``infusion_ID``, ``infusion_TIME``,
        ``AMT`` in 10^9 cells), ``event`` (EVID=2 markers: ``event_ID``, ``event_TIME``) and ``dvid``
        (``dvid_name``, ``dvid_unit``). Units are in each variable's ``attrs["units"]``.
        """
        import xarray as xr

        rec = self._records
        obs = rec[(rec["EVID"] == 0) & (rec["MDV"] == 0)]
        ids = self.ids
        position = {sid: i for i, sid in enumerate(ids)}
        dv = obs["DV"].to_numpy(dtype=float).copy()
        blq = obs["BLQ"].to_numpy(dtype=np.int64)
        lloq = obs["LLOQ"].to_numpy(dtype=float)
        censored = blq == 1
        dv[censored] = lloq[censored]
        dv_units = "cells/µL (DVID 1, 2); copies/µg gDNA (DVID 3); 0/1 (DVID 10, 11); score (DVID 12)"
        inf = rec[rec["EVID"] == 1]
        ev = rec[rec["EVID"] == 2]
        data_vars: dict[str, Any] = {
            "DV": ("obs", dv, {"units": dv_units, "long_name": "observed value (LLOQ where BLQ=1)"}),
            "BLQ": ("obs", blq, {"units": "1", "long_name": "1 = below the limit of quantification"}),
            "LLOQ": ("obs", lloq, {"units": "units of DV", "long_name": "lower limit of quantification"}),
            "dose_level": ("subject", np.array([s.dl for s in self._subjects], dtype=object), {}),
            "AMT": ("infusion", inf["AMT"].to_numpy(dtype=float), {"units": "10^9 cells"}),
        }
        for name in self._covariate_names:
            values = np.array([s.covariates[name] for s in self._subjects], dtype=float)
            data_vars[name] = ("subject", values, {"units": KNOWN_COVARIATES.get(name, "as in the file")})
        coords: dict[str, Any] = {
            "obs": np.arange(len(obs)),
            "ID": ("obs", np.array(obs["ID"].tolist(), dtype=object)),
            "TIME": ("obs", obs["TIME"].to_numpy(dtype=float), {"units": "days"}),
            "DVID": ("obs", obs["DVID"].to_numpy(dtype=np.int64)),
            "subject_index": ("obs", np.array([position[i] for i in obs["ID"]], dtype=np.int64)),
            "subject": np.array(ids, dtype=object),
            "infusion_ID": ("infusion", np.array(inf["ID"].tolist(), dtype=object)),
            "infusion_TIME": ("infusion", inf["TIME"].to_numpy(dtype=float), {"units": "days"}),
            "event_ID": ("event", np.array(ev["ID"].tolist(), dtype=object)),
            "event_TIME": ("event", ev["TIME"].to_numpy(dtype=float), {"units": "days"}),
            "dvid": np.array(list(DVIDS), dtype=np.int64),
            "dvid_name": ("dvid", np.array([v[0] for v in DVIDS.values()], dtype=object)),
            "dvid_unit": ("dvid", np.array([v[1] for v in DVIDS.values()], dtype=object)),
        }
        attrs = {
            "source": str(self._source) if self._source is not None else "",
            "synthetic": int(self.synthetic),
            "comments": "\n".join(self._comments),
        }
        return xr.Dataset(data_vars=data_vars, coords=coords, attrs=attrs)

    def summary(self) -> CohortSummary:
        """Counts that say what is in the cohort (see :class:`CohortSummary`)."""
        rec = self._records
        is_obs = (rec["EVID"] == 0) & (rec["MDV"] == 0)
        obs = rec[is_obs]
        per_dl: dict[str, int] = {}
        amounts: dict[str, tuple[float, ...]] = {}
        for dl in self.dose_levels:
            members = [s for s in self._subjects if s.dl == dl]
            per_dl[dl] = len(members)
            amounts[dl] = tuple(sorted({a for s in members for _, a in s.doses}))
        dvid_rows = []
        for dvid in sorted(int(d) for d in obs["DVID"].unique()):
            sel = obs[obs["DVID"] == dvid]
            n_blq = int((sel["BLQ"] == 1).sum())
            name, unit = DVIDS.get(dvid, ("?", "?"))
            dvid_rows.append(
                {
                    "DVID": dvid,
                    "measure": name,
                    "unit": unit,
                    "observations": len(sel),
                    "blq": n_blq,
                    "blq_fraction": n_blq / len(sel),
                }
            )
        by_dvid = pd.DataFrame(
            dvid_rows, columns=["DVID", "measure", "unit", "observations", "blq", "blq_fraction"]
        ).set_index("DVID")
        subj_rows = []
        for s in self._subjects:
            obs_t = s.observations["TIME"]
            subj_rows.append(
                {
                    "ID": s.id,
                    "DL": s.dl,
                    "infusions": len(s.doses),
                    "total_AMT": float(sum(a for _, a in s.doses)),
                    "events": len(s.ld_times),
                    "observations": len(s.observations),
                    "follow_up": float(obs_t.max()) if len(obs_t) else math.nan,
                }
            )
        per_subject = pd.DataFrame(
            subj_rows,
            columns=["ID", "DL", "infusions", "total_AMT", "events", "observations", "follow_up"],
        ).set_index("ID")
        return CohortSummary(
            source=str(self._source) if self._source is not None else None,
            synthetic=self.synthetic,
            comments=self._comments,
            n_subjects=len(self._subjects),
            n_records=len(rec),
            n_observations=int(is_obs.sum()),
            subjects_per_dl=per_dl,
            infusion_amounts=amounts,
            by_dvid=by_dvid,
            per_subject=per_subject,
        )

    # -- dunder ------------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cohort):
            return NotImplemented
        return self._comments == other._comments and self._records.equals(other._records)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        src = str(self._source) if self._source is not None else None
        return (
            f"Cohort(source={src!r}, subjects={len(self._subjects)}, records={len(self._records)}, "
            f"synthetic={self.synthetic})"
        )


@dataclass(frozen=True, eq=False)
class CohortSummary:
    """What a cohort holds, for people: counts per dose level, per DVID and per subject.

    Attributes
    ----------
    source : str or None
        The file read.
    synthetic : bool
        Mirrors :attr:`Cohort.synthetic`.
    comments : tuple[str, ...]
        Provenance comment lines.
    n_subjects, n_records, n_observations : int
        Counts of subjects, records (all rows) and observations (EVID=0, MDV=0 rows).
    subjects_per_dl : dict[str, int]
        Subjects per dose-level label.
    infusion_amounts : dict[str, tuple[float, ...]]
        Distinct AMT values (10^9 cells per infusion) per dose-level label.
    by_dvid : pandas.DataFrame
        Indexed by DVID: ``measure``, ``unit``, ``observations``, ``blq`` (count of BLQ=1 rows) and
        ``blq_fraction``.
    per_subject : pandas.DataFrame
        Indexed by ID: ``DL``, ``infusions``, ``total_AMT`` (10^9 cells), ``events`` (EVID=2 rows),
        ``observations`` and ``follow_up`` (TIME of the last observation, days; NaN when none).
    """

    source: str | None
    synthetic: bool
    comments: tuple[str, ...]
    n_subjects: int
    n_records: int
    n_observations: int
    subjects_per_dl: dict[str, int]
    infusion_amounts: dict[str, tuple[float, ...]]
    by_dvid: pd.DataFrame
    per_subject: pd.DataFrame

    @property
    def observations_per_dvid(self) -> dict[int, int]:
        """Number of observations per DVID."""
        return {int(k): int(v) for k, v in self.by_dvid["observations"].items()}

    @property
    def blq_fraction_per_dvid(self) -> dict[int, float]:
        """Fraction of observations with BLQ=1 per DVID."""
        return {int(k): float(v) for k, v in self.by_dvid["blq_fraction"].items()}

    @property
    def follow_up(self) -> dict[str, float]:
        """TIME (days) of each subject's last observation; NaN for a subject without observations."""
        return {str(k): float(v) for k, v in self.per_subject["follow_up"].items()}

    def render(self) -> RenderableType:
        """A rich renderable: a SYNTHETIC banner when synthetic, a headline and three tables."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        if self.synthetic:
            parts.append(
                Panel(
                    Text("SYNTHETIC cohort: simulated numbers, not trial data", justify="center"),
                    style="bold white on red",
                    expand=True,
                )
            )
        head = Text()
        head.append(self.source or "<dataframe>", style="bold")
        head.append(
            f": {self.n_subjects} subjects, {self.n_records} records, {self.n_observations} observations"
        )
        parts.append(head)
        for c in self.comments:
            parts.append(Text(f"# {c}", style="dim"))

        t_dl = Table(title="Subjects per dose level", title_justify="left")
        t_dl.add_column("DL")
        t_dl.add_column("subjects", justify="right")
        t_dl.add_column("AMT per infusion (10^9 cells)", justify="right")
        for dl, n in self.subjects_per_dl.items():
            per_inf = ", ".join(_format_number(a) for a in self.infusion_amounts.get(dl, ()))
            t_dl.add_row(Text(dl), str(n), Text(per_inf or "-"))
        parts.append(t_dl)

        t_dv = Table(title="Observations per DVID", title_justify="left")
        for name, justify in [
            ("DVID", "right"),
            ("measure", "left"),
            ("unit", "left"),
            ("observations", "right"),
            ("BLQ", "right"),
            ("BLQ fraction", "right"),
        ]:
            t_dv.add_column(name, justify=justify)  # type: ignore[arg-type]
        for dvid, row in self.by_dvid.iterrows():
            t_dv.add_row(
                str(dvid),
                Text(str(row["measure"])),
                Text(str(row["unit"])),
                str(row["observations"]),
                str(row["blq"]),
                f"{row['blq_fraction']:.0%}",
            )
        parts.append(t_dv)

        t_s = Table(title="Subjects", title_justify="left")
        for name in ("ID", "DL", "infusions", "LD/events", "observations", "follow-up (day)"):
            t_s.add_column(name, justify="left" if name in ("ID", "DL") else "right")
        for sid, row in self.per_subject.iterrows():
            fu = "-" if math.isnan(row["follow_up"]) else _format_number(row["follow_up"])
            t_s.add_row(
                Text(str(sid)),
                Text(str(row["DL"])),
                str(row["infusions"]),
                str(row["events"]),
                str(row["observations"]),
                fu,
            )
        parts.append(t_s)
        return Group(*parts)

    def __rich__(self) -> RenderableType:
        return self.render()

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=100, color_system=None, force_terminal=False).print(self.render())
        return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def read_cohort(path: str | os.PathLike[str]) -> Cohort:
    """Read and check a cohort file.

    Parameters
    ----------
    path : path-like
        A cohort CSV (comma, semicolon or tab separated; UTF-8, optional BOM) in the layout of
        ``data-format.md``: TIME in days, AMT in 10^9 cells, DV and LLOQ in natural units.

    Returns
    -------
    Cohort

    Raises
    ------
    DataError
        Listing every problem found, one per line, as ``FILE:ROW:COLUMN: message``; also for a file
        that does not exist or cannot be read.

    Warns
    -----
    CohortWarning
        For a subject without infusions, with infusions but no observations yet, or with CAR-NK
        observations (DVID 1, 3) before its first infusion; for ignored text columns and
        commented-out records.
    """
    file = str(path)
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(
            [
                Problem(
                    file,
                    None,
                    None,
                    "file not found (found nothing at this path, expected a cohort CSV file)",
                )
            ]
        ) from None
    except IsADirectoryError:
        raise DataError(
            [Problem(file, None, None, "is a directory (found a directory, expected a cohort CSV file)")]
        ) from None
    except OSError as exc:
        raise DataError(
            [
                Problem(
                    file,
                    None,
                    None,
                    f"cannot be read (found {exc.strerror or exc}, expected a readable file)",
                )
            ]
        ) from None
    try:
        table, problems = _split_text(file, data)
        if problems or table is None:
            raise DataError(_sorted(problems, None))
        return _build(table, p)
    except DataError:
        raise
    except Exception as exc:  # a data problem never surfaces as a traceback
        raise DataError([_internal_problem(file, exc)]) from exc


def write_cohort(cohort: Cohort, path: str | os.PathLike[str]) -> Path:
    """Write a cohort in the file format, atomically (a temporary file in the same folder, then rename).

    Comments come first (``# text``), then a comma-separated header and one line per record in
    :meth:`Cohort.to_dataframe` order; missing values are written ``.``. Reading the file back gives an
    equal cohort.

    Parameters
    ----------
    cohort : Cohort
    path : path-like
        Destination; an existing file is replaced.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    df = cohort.to_dataframe()
    buf = io.StringIO()
    for c in cohort.comments:
        buf.write(f"# {c}".rstrip() + "\n")
    buf.write(",".join(_format_text(str(c)) for c in df.columns) + "\n")
    for row in df.itertuples(index=False, name=None):
        buf.write(",".join(_format_cell(v) for v in row) + "\n")
    from carnk_pkpd.atomic import write_text_atomic

    return write_text_atomic(path, buf.getvalue(), newline="")


def embedded_cohort_path(name: str = "example") -> Path:
    """Path of a cohort file shipped with the package (``resources/<name>_cohort.csv``).

    Parameters
    ----------
    name : str
        ``"example"`` (a small SYNTHETIC cohort) or another shipped name.

    Raises
    ------
    ValueError
        When no such cohort is shipped; the message lists the available names.
    """
    folder = resources.files("carnk_pkpd").joinpath("resources")
    target = folder.joinpath(f"{name}_cohort.csv")
    if not target.is_file():
        available = sorted(
            e.name.removesuffix("_cohort.csv") for e in folder.iterdir() if e.name.endswith("_cohort.csv")
        )
        raise ValueError(f"no embedded cohort named {name!r} (found: {', '.join(available) or 'none'})")
    return Path(str(target))


def render_summary(cohort: Cohort, console: Console | None = None) -> CohortSummary:
    """Print a cohort's summary with rich (SYNTHETIC banner first when synthetic).

    Parameters
    ----------
    cohort : Cohort
    console : rich.console.Console, optional
        Where to print (a new stdout console when None).

    Returns
    -------
    CohortSummary
        The summary printed.
    """
    if console is None:
        from rich.console import Console

        console = Console()
    summary = cohort.summary()
    console.print(summary.render())
    return summary


# --------------------------------------------------------------------------------------------------
# Reading: bytes -> table of cells
# --------------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """Cells before checking: one list per record, aligned with ``columns`` (upper-case names)."""

    file: str
    header_row: int
    columns: list[str]
    cells: list[list[object]]
    rows: list[int]
    comments: tuple[str, ...]
    decimal_comma: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _split_text(file: str, data: bytes) -> tuple[_Table | None, list[Problem]]:
    """Decode the bytes and split them into comments, header and cells (problems when unreadable)."""

    def whole(message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(file, None, None, message)]

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return whole(
            "UTF-16 text (found a UTF-16 byte-order mark, expected UTF-8; save the file as CSV UTF-8)"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        return whole(f"binary content, not a text CSV (found a NUL byte on line {line}, expected UTF-8 text)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return whole(
            f"not valid UTF-8 text (found byte 0x{data[exc.start]:02x} on line {line}, expected UTF-8; "
            "save the file as CSV UTF-8)"
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")

    comments: list[str] = []
    header_index = None
    for i, line in enumerate(lines):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            comments.append(s[1:].strip())
            continue
        header_index = i
        break
    if header_index is None:
        return whole(
            "empty file (found no header line, expected a header such as "
            f"{','.join(STANDARD_COLUMNS)} and one line per record)"
        )
    header_row = header_index + 1
    header_line = lines[header_index]
    sep, message = _sniff_separator(header_line)
    if sep is None:
        return None, [Problem(file, header_row, None, message or "unreadable header")]
    try:
        header_cells = _split_line(header_line, sep)
    except csv.Error as exc:
        return None, [
            Problem(
                file,
                header_row,
                None,
                f"malformed header (found {exc}, expected {_SEPARATORS[sep]}-separated names with balanced quotes)",
            )
        ]
    names = [c.strip().upper() for c in header_cells]
    while names and names[-1] == "":
        names.pop()  # trailing separators in the header (spreadsheet exports)

    table = _Table(
        file=file,
        header_row=header_row,
        columns=names,
        cells=[],
        rows=[],
        comments=tuple(comments),
        decimal_comma=sep != ",",
    )
    width = len(names)
    others = [d for d in _SEPARATORS if d != sep]
    for i in range(header_index + 1, len(lines)):
        line = lines[i]
        row = i + 1
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            table.notes.append(f"row {row} starts with # and was skipped as a commented-out record")
            continue
        try:
            cells = _split_line(line, sep)
        except csv.Error as exc:
            table.problems.append(
                Problem(
                    file,
                    row,
                    None,
                    f"malformed quoting (found {exc}, expected {_SEPARATORS[sep]}-separated cells with balanced quotes)",
                )
            )
            table.cells.append([])
            table.rows.append(row)
            continue
        if all(not c.strip() for c in cells):
            continue  # a separators-only line
        if len(cells) < width or any(c.strip() for c in cells[width:]):
            hint = ""
            if len(cells) == 1 and any(d in line for d in others):
                other = next(d for d in others if d in line)
                hint = f"; the row seems {_SEPARATORS[other]}-separated, unlike the header"
            word = "few" if len(cells) < width else "many"
            table.problems.append(
                Problem(
                    file,
                    row,
                    None,
                    f"too {word} cells (found {len(cells)}, expected {width}, one per header column{hint})",
                )
            )
            table.cells.append([])
            table.rows.append(row)
            continue
        table.cells.append(list(cells[:width]))
        table.rows.append(row)
    return table, []


def _split_line(line: str, sep: str) -> list[str]:
    """Split one physical line into cells (csv quoting rules, strict)."""
    return next(csv.reader([line], delimiter=sep, quotechar='"', strict=True), [])


def _sniff_separator(header: str) -> tuple[str | None, str | None]:
    """The header's separator, or None and a problem message."""
    present = [d for d in _SEPARATORS if d in header]
    if len(present) == 1:
        return present[0], None
    if not present:
        return None, (
            f"no column separator in the header (found {_clip(header.strip())!r}, expected column names "
            "separated by commas, semicolons or tabs)"
        )
    for d in present:
        names = {n.strip().strip('"').upper() for n in header.split(d)}
        if set(REQUIRED_COLUMNS) <= names:
            return d, None
    found = " and ".join(_SEPARATORS[d] + "s" for d in present)
    return None, (
        f"ambiguous column separator (found {found} in the header, expected one separator: "
        "comma, semicolon or tab)"
    )


# --------------------------------------------------------------------------------------------------
# Checking: table of cells -> records
# --------------------------------------------------------------------------------------------------


class _Bad:
    """Sentinel for a cell that could not be read (its problem is already reported) or is absent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<bad>"


_BAD: Any = _Bad()


def _build(table: _Table, source: Path | None) -> Cohort:
    """Check a table; raise DataError with every problem, or warn and return the cohort."""
    checked = _Checker(table).run()
    if checked.problems:
        raise DataError(_sorted(checked.problems, table.columns))
    for note in checked.notes:
        warnings.warn(f"{table.file}: {note}", CohortWarning, stacklevel=3)
    return Cohort(
        checked.records,
        source=source,
        comments=table.comments,
        covariate_names=checked.covariate_names,
        time_varying=checked.time_varying,
    )


@dataclass
class _Checked:
    problems: list[Problem]
    notes: list[str]
    records: pd.DataFrame
    covariate_names: tuple[str, ...]
    time_varying: tuple[str, ...]


class _Checker:
    """Applies every rule of the format to a table and collects problems and warnings."""

    def __init__(self, table: _Table) -> None:
        self.t = table
        self.problems: list[Problem] = list(table.problems)
        self.notes: list[str] = list(table.notes)
        self.n = len(table.cells)

    def add(self, row: int | None, column: str | None, message: str) -> None:
        self.problems.append(Problem(self.t.file, row, column, message))

    # -- columns -----------------------------------------------------------------------------------

    def _columns(self) -> dict[str, int]:
        """Map each usable column name to its cell index; report empty, duplicate and missing names."""
        index: dict[str, int] = {}
        hr = self.t.header_row
        for k, name in enumerate(self.t.columns):
            if not name:
                self.add(hr, f"column {k + 1}", "empty column name (found nothing, expected a name)")
            elif name in index:
                self.add(
                    hr,
                    name,
                    f"duplicate column (found {name} in columns {index[name] + 1} and {k + 1}, "
                    "expected each column once)",
                )
            else:
                index[name] = k
        found = ", ".join(n for n in self.t.columns if n) or "none"
        for name in REQUIRED_COLUMNS:
            if name not in index:
                self.add(
                    hr,
                    name,
                    f"required column missing (found {_clip(found, 120)}, expected "
                    f"{', '.join(REQUIRED_COLUMNS)}; MDV, BLQ and LLOQ are optional)",
                )
        return index

    def _cell(self, i: int, k: int | None) -> object:
        cells = self.t.cells[i]
        if k is None or not cells:
            return _BAD
        return cells[k]

    def _numbers(self, name: str, k: int | None, expected: str) -> list[Any]:
        out: list[Any] = []
        for i in range(self.n):
            cell = self._cell(i, k)
            if cell is _BAD:
                out.append(_BAD)
                continue
            value, error = _parse_number(cell, self.t.decimal_comma)
            if error is not None:
                self.add(
                    self.t.rows[i], name, f"{error}, expected {expected}; write . or leave empty for missing)"
                )
                out.append(_BAD)
            else:
                out.append(value)
        return out

    def _labels(self, name: str, k: int | None, expected: str) -> list[Any]:
        out: list[Any] = []
        for i in range(self.n):
            cell = self._cell(i, k)
            if cell is _BAD:
                out.append(_BAD)
                continue
            value, error = _parse_label(cell)
            if error is not None:
                self.add(self.t.rows[i], name, f"{error}, expected {expected})")
                out.append(_BAD)
            elif value is None:
                self.add(self.t.rows[i], name, f"{name} missing (found ., expected {expected})")
                out.append(_BAD)
            else:
                out.append(value)
        return out

    def _codes(
        self, name: str, values: list[Any], allowed: Sequence[int], meaning: str, missing: Any
    ) -> None:
        """Restrict a numeric code column to ``allowed`` (in place); ``missing`` replaces None."""
        for i, v in enumerate(values):
            if v is _BAD:
                continue
            if v is None:
                if missing is _BAD:
                    self.add(self.t.rows[i], name, f"{name} missing (found ., expected {meaning})")
                values[i] = missing
            elif v not in allowed:
                word = "unknown" if name == "EVID" else "invalid"
                self.add(
                    self.t.rows[i], name, f"{word} {name} (found {_format_number(v)}, expected {meaning})"
                )
                values[i] = _BAD
            else:
                values[i] = int(v)

    # -- the rules ---------------------------------------------------------------------------------

    def run(self) -> _Checked:
        t = self.t
        index = self._columns()
        rows = t.rows
        if self.n == 0:
            self.add(None, None, "no data rows (found only the header, expected at least one record)")

        ids = self._labels("ID", index.get("ID"), "a subject identifier")
        dls = self._labels("DL", index.get("DL"), "a dose-level label such as 1, 2, 3 or 4")
        num: dict[str, list[Any]] = {}
        for name in ("TIME", "EVID", "AMT", "DVID", "DV", "MDV", "BLQ", "LLOQ"):
            if name in index:
                num[name] = self._numbers(name, index[name], _EXPECTED_NUMBER[name])
            elif name in REQUIRED_COLUMNS:
                num[name] = [_BAD] * self.n
            else:
                num[name] = [None] * self.n
        time, evid, amt, dvid, dv = num["TIME"], num["EVID"], num["AMT"], num["DVID"], num["DV"]
        blq, lloq = num["BLQ"], num["LLOQ"]
        for i, v in enumerate(time):
            if v is None:
                self.add(rows[i], "TIME", "TIME missing (found ., expected a time in days)")
                time[i] = _BAD
        self._codes(
            "EVID",
            evid,
            EVIDS,
            "one of 0, 1, 2: 0 observation, 1 CAR-NK infusion, 2 other event such as lymphodepletion",
            _BAD,
        )
        self._codes("MDV", num["MDV"], (0, 1), "0 or 1", None)
        self._codes("BLQ", blq, (0, 1), "0 or 1", 0)

        # Extra columns: covariates (constant within a subject) or time-varying; text-only ignored.
        extras: dict[str, list[Any]] = {}
        for name, k in index.items():
            if name in STANDARD_COLUMNS:
                continue
            if name not in KNOWN_COVARIATES and self._text_only(k):
                self.notes.append(f"column {name} holds text, not numbers, and was ignored")
                continue
            unit = KNOWN_COVARIATES.get(name)
            extras[name] = self._numbers(name, k, f"a number ({unit})" if unit else "a number")

        eff_mdv = self._row_rules(num, has_lloq="LLOQ" in index)

        self._subject_rules(ids, time, dls, extras)
        # Duplicates compare records as they are kept (MDV and DVID defaults filled in).
        kept = num | {"MDV": eff_mdv, "DVID": [0 if v is None else v for v in dvid]}
        self._duplicates(ids, dls, kept, extras)

        covariates, time_varying = self._classify(ids, extras)
        records = None
        if not self.problems:
            self._warnings(ids, evid, eff_mdv, dvid)
            data: dict[str, Any] = {
                "ID": pd.Series(ids, dtype=_text_dtype()),
                "TIME": np.array(time, dtype=float),
                "EVID": np.array(evid, dtype=np.int64),
                "AMT": _floats(amt),
                "DVID": np.array([0 if x is None else int(x) for x in dvid], dtype=np.int64),
                "DV": _floats(dv),
                "MDV": np.array(eff_mdv, dtype=np.int64),
                "BLQ": np.array(blq, dtype=np.int64),
                "LLOQ": _floats(lloq),
                "DL": pd.Series(dls, dtype=_text_dtype()),
            }
            for name in (*covariates, *time_varying):
                data[name] = _floats(extras[name])
            records = pd.DataFrame(data)
        return _Checked(
            problems=self.problems,
            notes=self.notes,
            records=records if records is not None else pd.DataFrame(),
            covariate_names=covariates,
            time_varying=time_varying,
        )

    # -- rules on one row --------------------------------------------------------------------------

    def _row_rules(self, num: dict[str, list[Any]], has_lloq: bool) -> list[Any]:
        """Check each record on its own; return the effective MDV per record (defaults filled)."""
        eff_mdv: list[Any] = [_BAD] * self.n
        for i in range(self.n):
            row = self.t.rows[i]
            e, m, d, b = num["EVID"][i], num["MDV"][i], num["DV"][i], num["BLQ"][i]
            eff_mdv[i] = m_eff = _effective_mdv(e, m, d, b)
            is_obs = (e == 0 and m_eff == 0) if (e is not _BAD and m_eff is not _BAD) else None
            self._check_amt(row, e, num["AMT"][i])
            num["DVID"][i] = v = self._check_dvid(row, is_obs, num["DVID"][i])
            if is_obs and d is not _BAD:
                self._check_dv(row, v, d, b)
            self._check_lloq(row, e, is_obs, b, d, num["LLOQ"][i], has_lloq)
        return eff_mdv

    def _check_amt(self, row: int, e: Any, a: Any) -> None:
        if a is _BAD:
            return
        if e == 1 and (a is None or a <= 0):
            self.add(
                row,
                "AMT",
                f"EVID=1 infusion without a positive AMT (found {_show(a)}, expected AMT > 0 in 10^9 cells)",
            )
        elif e == 0 and a is not None and a != 0:
            self.add(
                row,
                "AMT",
                f"AMT on an observation row (found {_show(a)}, expected 0 or missing on EVID=0 rows)",
            )

    def _check_dvid(self, row: int, is_obs: bool | None, v: Any) -> Any:
        """Check DVID; return it, or _BAD when it is wrong (so later rules skip it)."""
        if v is _BAD:
            return v
        if is_obs:
            if v is None or v == 0:
                self.add(
                    row,
                    "DVID",
                    f"DVID missing on an observation row (found {_show(v)}, expected one of {_ALLOWED_DVIDS_TEXT})",
                )
                return _BAD
            if v not in DVIDS:
                self.add(
                    row, "DVID", f"unknown DVID (found {_show(v)}, expected one of {_ALLOWED_DVIDS_TEXT})"
                )
                return _BAD
        elif v is not None and v != 0 and v not in DVIDS:
            self.add(
                row,
                "DVID",
                f"unknown DVID (found {_show(v)}, expected one of {_ALLOWED_DVIDS_TEXT}, "
                "or 0 or missing on dose, EVID=2 and MDV=1 rows)",
            )
            return _BAD
        return v

    def _check_dv(self, row: int, v: Any, d: Any, b: Any) -> None:
        """DV of an observation (EVID=0, MDV=0) row."""
        if d is None:
            if b != 1:
                self.add(
                    row,
                    "DV",
                    "observation without DV (found ., expected a value >= 0, or MDV=1 for a missing sample)",
                )
        elif d < 0:
            self.add(row, "DV", f"negative DV (found {_show(d)}, expected DV >= 0 in natural units, not log)")
        elif v in _BINARY_DVIDS and d not in (0, 1):
            name = DVIDS[int(v)][0]
            self.add(row, "DV", f"{name} (DVID {int(v)}) must be 0 or 1 (found {_show(d)}, expected 0 or 1)")
        elif v == 12 and not (float(d).is_integer() and d <= _SLEDAI_MAX):
            self.add(
                row,
                "DV",
                f"SLEDAI-2K score out of range (found {_show(d)}, expected a whole number from 0 to {_SLEDAI_MAX})",
            )

    def _check_lloq(
        self, row: int, e: Any, is_obs: bool | None, b: Any, d: Any, q: Any, has_lloq: bool
    ) -> None:
        if q is _BAD:
            return
        if e == 0 and b == 1 and (q is None or q <= 0):
            found = _show(q) if has_lloq else "no LLOQ column"
            self.add(
                row,
                "LLOQ",
                f"BLQ=1 without a positive LLOQ (found {found}, expected LLOQ > 0 in the units of DV)",
            )
        elif q is not None and q < 0:
            self.add(row, "LLOQ", f"negative LLOQ (found {_show(q)}, expected LLOQ > 0, or 0 or missing)")
        elif is_obs and b == 1 and d is not _BAD and d is not None and q is not None and d > q:
            self.add(
                row,
                "DV",
                f"BLQ=1 but DV above LLOQ (found DV {_show(d)}, expected DV <= LLOQ {_show(q)} or missing)",
            )

    # -- rules across rows -------------------------------------------------------------------------

    def _text_only(self, k: int) -> bool:
        """True when the column has text and not a single number (a label column such as SITE)."""
        seen_text = False
        for i in range(self.n):
            cell = self._cell(i, k)
            if cell is _BAD:
                continue
            value, error = _parse_number(cell, self.t.decimal_comma)
            if error is None and value is not None:
                return False
            if error is not None:
                seen_text = True
        return seen_text

    def _subject_rules(
        self, ids: list[Any], time: list[Any], dls: list[Any], extras: dict[str, list[Any]]
    ) -> None:
        """Contiguous subjects, non-decreasing TIME, DL and known covariates constant within a subject."""
        rows = self.t.rows
        block_end: dict[str, int] = {}
        current: str | None = None
        prev_time: dict[str, tuple[float, int]] = {}
        first: dict[tuple[str, str], tuple[Any, int]] = {}
        reported: set[tuple[str, str, Any]] = set()
        constant = {"DL": dls} | {k: v for k, v in extras.items() if k in KNOWN_COVARIATES}
        for i in range(self.n):
            sid = ids[i]
            if sid is _BAD:
                continue
            row = rows[i]
            if sid != current:
                if sid in block_end:
                    self.add(
                        row,
                        "ID",
                        f"rows of subject {sid} are not contiguous (found subject {sid} again after subject "
                        f"{current}, expected all its rows together; its earlier rows end at row {block_end[sid]})",
                    )
                current = sid
            block_end[sid] = row
            t = time[i]
            if t is not _BAD:
                if sid in prev_time and t < prev_time[sid][0]:
                    pt, prow = prev_time[sid]
                    self.add(
                        row,
                        "TIME",
                        f"TIME decreases within subject {sid} (found {_show(t)}, expected >= {_show(pt)} as on "
                        f"row {prow})",
                    )
                prev_time[sid] = (t, row)
            for name, values in constant.items():
                v = values[i]
                if v is _BAD or v is None:
                    continue
                key = (sid, name)
                if key not in first:
                    first[key] = (v, row)
                elif v != first[key][0] and (sid, name, v) not in reported:
                    reported.add((sid, name, v))
                    fv, frow = first[key]
                    self.add(
                        row,
                        name,
                        f"{name} changes within subject {sid} (found {_show(v)}, expected {_show(fv)} as on "
                        f"row {frow}; {name} is constant within a subject)",
                    )

    def _duplicates(
        self, ids: list[Any], dls: list[Any], num: dict[str, list[Any]], extras: dict[str, list[Any]]
    ) -> None:
        seen: dict[tuple[Any, ...], int] = {}
        columns = [ids, dls, *num.values(), *extras.values()]
        for i in range(self.n):
            key = tuple(c[i] for c in columns)
            if any(x is _BAD for x in key):
                continue
            if key in seen:
                self.add(
                    self.t.rows[i],
                    None,
                    f"duplicate record (found the same values as row {seen[key]}, expected each record once)",
                )
            else:
                seen[key] = self.t.rows[i]

    def _classify(
        self, ids: list[Any], extras: dict[str, list[Any]]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Split extra columns into per-subject covariates and time-varying columns."""
        covariates: list[str] = []
        varying: list[str] = []
        for name, values in extras.items():
            if name in KNOWN_COVARIATES:
                covariates.append(name)
                continue
            firsts: dict[Any, Any] = {}
            constant = True
            for sid, v in zip(ids, values, strict=True):
                if v is None or v is _BAD or sid is _BAD:
                    continue
                if firsts.setdefault(sid, v) != v:
                    constant = False
                    break
            (covariates if constant else varying).append(name)
        return tuple(covariates), tuple(varying)

    def _warnings(self, ids: list[str], evid: list[int], mdv: list[int], dvid: list[Any]) -> None:
        """Record what a user may intend: no infusion, no observation yet, CAR-NK samples before dosing."""
        order: list[str] = []
        info: dict[str, dict[str, Any]] = {}
        for i, sid in enumerate(ids):
            if sid not in info:
                order.append(sid)
                info[sid] = {"doses": 0, "obs": 0, "early": [], "ld": 0}
            s = info[sid]
            if evid[i] == 1:
                s["doses"] += 1
            elif evid[i] == 2:
                s["ld"] += 1
            elif evid[i] == 0 and mdv[i] == 0:
                s["obs"] += 1
                if s["doses"] == 0 and dvid[i] in _CAR_DVIDS:
                    s["early"].append(self.t.rows[i])
        for sid in order:
            s = info[sid]
            if s["doses"] == 0:
                self.notes.append(
                    f"subject {sid} has no CAR-NK infusion (no EVID=1 row); it contributes observations only"
                )
            else:
                if s["obs"] == 0:
                    self.notes.append(f"subject {sid} has infusions but no observations yet")
                if s["ld"] == 0:
                    self.notes.append(
                        f"subject {sid} has no lymphodepletion record (EVID=2); it is modelled as infused "
                        "without lymphodepletion (no LD kill, no IL-15 surge)"
                    )
                if s["early"]:
                    rows = ", ".join(str(r) for r in s["early"][:5]) + (
                        ", ..." if len(s["early"]) > 5 else ""
                    )
                    self.notes.append(
                        f"subject {sid} has {len(s['early'])} CAR-NK observation(s) (DVID 1 or 3) before its "
                        f"first infusion (rows {rows})"
                    )


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def _effective_mdv(e: Any, m: Any, d: Any, b: Any) -> Any:
    """MDV as kept: the file's value, else 1 on dose/EVID=2 rows and on observations without DV."""
    if e is _BAD or m is _BAD:
        return _BAD
    if m is not None:
        return m
    if e != 0:
        return 1
    if d is _BAD:
        return _BAD
    return 0 if (d is not None or b == 1) else 1


def _parse_number(cell: object, decimal_comma: bool) -> tuple[float | None, str | None]:
    """Read one numeric cell: ``(value, None)``, ``(None, None)`` when missing, ``(None, "… (found …")``.

    The error text is left open (``found …``) so the caller appends what it expected.
    """
    if isinstance(cell, str):
        text = cell.strip()
        if text in _MISSING_TOKENS:
            return None, None
        if _NUMBER.fullmatch(text):
            value = float(text)
        elif decimal_comma and _DECIMAL_COMMA.fullmatch(text):
            value = float(text.replace(",", "."))
        elif text.lower().lstrip("+-") in _NONFINITE_WORDS:
            return None, f"non-finite value (found {text!r}"
        else:
            return None, f"not a number (found {_clip(text)!r}"
        if not math.isfinite(value):
            return None, f"non-finite value (found {_clip(text)!r}"
        return value, None
    if _is_missing(cell):
        return None, None
    if isinstance(cell, (bool, np.bool_, int, np.integer, float, np.floating)):
        try:
            value = float(cell)
        except OverflowError:
            return None, f"non-finite value (found {_clip(str(cell))}"
        if not math.isfinite(value):
            return None, f"non-finite value (found {value!r}"
        return value, None
    return None, f"not a number (found {_clip(str(cell))!r}"


def _parse_label(cell: object) -> tuple[str | None, str | None]:
    """Read an ID or DL cell as text: ``(label, None)``, ``(None, None)`` when missing, or an error."""
    if isinstance(cell, str):
        text = cell.strip()
        if text in _MISSING_TOKENS:
            return None, None
        if "\n" in text or "\r" in text:
            return None, f"line break in a label (found {_clip(text)!r}"
        m = _INTEGRAL_TEXT.fullmatch(text)
        return (m.group(1) if m else text), None
    if _is_missing(cell):
        return None, None
    if isinstance(cell, (float, np.floating)) and not math.isfinite(float(cell)):
        return None, f"non-finite value (found {cell!r}"
    return _label_from_python(cell), None


def _label_from_python(value: object) -> str:
    """Text label of a Python value: integers and integral floats without a decimal part."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return str(int(v)) if v.is_integer() else repr(v)
    text = str(value).strip()
    m = _INTEGRAL_TEXT.fullmatch(text)
    return m.group(1) if m else text


def _is_missing(cell: object) -> bool:
    if cell is None or cell is pd.NA or cell is pd.NaT:
        return True
    if isinstance(cell, (float, np.floating)):
        return bool(np.isnan(cell))
    return False


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def _text_dtype() -> Any:
    """The dtype pandas infers for text (``str`` on pandas 3, object before)."""
    return pd.Series(["a"]).dtype


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _format_number(v: float) -> str:
    """Shortest text that reads back to the same float (integral values without ``.0``)."""
    v = float(v)
    if v.is_integer():
        return str(int(v))
    return repr(v)


def _show(v: Any) -> str:
    """A value as it appears in a message: ``.`` for missing, numbers without a trailing ``.0``."""
    if v is None:
        return "."
    if isinstance(v, (int, float, np.integer, np.floating)):
        return _format_number(float(v))
    return str(v)


def _format_text(text: str) -> str:
    """A text cell for a comma-separated line, quoted when it could be misread."""
    if any(ch in text for ch in ',";\t') or text.startswith("#") or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


def _format_cell(v: Any) -> str:
    if isinstance(v, str):
        return _format_text(v)
    if _is_missing(v):
        return "."
    return _format_number(float(v))


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _label_sort_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _normalise_comments(comments: Iterable[str] | str) -> tuple[str, ...]:
    """Comment lines without the leading ``#`` and surrounding spaces (multi-line text is split)."""
    if isinstance(comments, str):
        comments = [comments]
    out: list[str] = []
    for c in comments:
        for line in str(c).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            s = line.strip()
            out.append(s[1:].strip() if s.startswith("#") else s)
    return tuple(out)


def _sorted(problems: list[Problem], columns: list[str] | None) -> list[Problem]:
    """Problems in reading order: file-level first, then by row and by column position."""
    position = {name: k for k, name in enumerate(columns or [])}

    def key(p: Problem) -> tuple[int, int]:
        return (
            -1 if p.row is None else p.row,
            -1 if p.column is None else position.get(p.column, len(position)),
        )

    return sorted(problems, key=key)


def _internal_problem(file: str, exc: BaseException) -> Problem:
    return Problem(
        file,
        None,
        None,
        f"could not be read (found an internal error {type(exc).__name__}: {_clip(str(exc), 200)}, "
        "expected a readable cohort file; please report this together with the file)",
    )


def _make_subjects(records: pd.DataFrame, covariate_names: tuple[str, ...]) -> list[Subject]:
    """Group checked records into subjects (rows of a subject are contiguous)."""
    subjects: list[Subject] = []
    if records.empty:
        return subjects
    ids = records["ID"].to_numpy(dtype=object)
    dls = records["DL"].to_numpy(dtype=object)
    col = {c: records[c].to_numpy() for c in ("TIME", "EVID", "AMT", "DVID", "DV", "MDV", "BLQ", "LLOQ")}
    cov = {c: records[c].to_numpy(dtype=float) for c in covariate_names}
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = [0, *change.tolist(), len(ids)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        evid, time = col["EVID"][a:b], col["TIME"][a:b]
        is_dose, is_obs = evid == 1, (evid == 0) & (col["MDV"][a:b] == 0)
        blq, lloq = col["BLQ"][a:b][is_obs], col["LLOQ"][a:b][is_obs]
        obs = pd.DataFrame(
            {
                "TIME": time[is_obs],
                "DVID": col["DVID"][a:b][is_obs],
                "DV": np.where(blq == 1, lloq, col["DV"][a:b][is_obs]),
                "BLQ": blq,
                "LLOQ": lloq,
            }
        )
        covariates: dict[str, float] = {}
        for name, values in cov.items():
            present = values[a:b][~np.isnan(values[a:b])]
            covariates[name] = float(present[0]) if len(present) else math.nan
        subjects.append(
            Subject(
                id=str(ids[a]),
                dl=str(dls[a]),
                covariates=covariates,
                doses=[
                    (float(t), float(x)) for t, x in zip(time[is_dose], col["AMT"][a:b][is_dose], strict=True)
                ],
                ld_times=[float(t) for t in time[evid == 2]],
                observations=obs,
            )
        )
    return subjects
