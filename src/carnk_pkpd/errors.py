"""Errors a user can act on: each names the file, and where it applies the row, column or key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found in an input file.

    ``row`` is the 1-based physical line number (the header is row 1 when the file has no leading
    comment lines); ``row`` and ``column`` are ``None`` when the problem concerns the whole file.
    """

    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f":{self.row}"
        if self.column is not None:
            where += f":{self.column}"
        return f"{where}: {self.message}"


class DataError(ValueError):
    """A cohort file has problems; ``.problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ModelFileError(ValueError):
    """A model file under ``models/`` is wrong; the message names the file and the key."""

    def __init__(self, file: str, key: str | None, message: str):
        self.file, self.key = file, key
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {message}")


class FitError(RuntimeError):
    """A saved fit folder is damaged or incompatible; the message names the file."""


class OutputRefused(Exception):
    """A command refused to write because something that is not its own output would be lost.

    The message names the path, says what would be lost and how to proceed; nothing was written.
    """


class OutputExists(OutputRefused, FileExistsError):
    """The command's own earlier output exists and replacing it needs ``overwrite`` (``--overwrite``)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0])


class IdentifiabilityWarning(UserWarning):
    """A fit has too few subjects to estimate what the model asks of it (e.g. BSV SDs)."""


#: Fewer subjects than this per estimated BSV SD and the SDs mostly reflect their priors.
MIN_SUBJECTS_PER_OMEGA = 5


def warn_bsv_identifiability(n_omega: int, n_subjects: int, source: object = None) -> None:
    """Warn when ``n_subjects`` cannot inform ``n_omega`` between-subject SDs (< 5 subjects per SD)."""
    import warnings

    if n_omega > 0 and n_subjects < MIN_SUBJECTS_PER_OMEGA * n_omega:
        where = f"{source}: " if source else ""
        warnings.warn(
            f"{where}{n_subjects} subject(s) for {n_omega} estimated between-subject SDs (omega): fewer than "
            f"{MIN_SUBJECTS_PER_OMEGA} per omega, so the BSV is not identifiable and the omega posteriors "
            "mostly restate their priors",
            IdentifiabilityWarning,
            stacklevel=3,
        )
