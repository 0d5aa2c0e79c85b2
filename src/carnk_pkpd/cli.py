"""The ``carnk-pkpd`` command line (typer for arguments, rich for tables and progress).

Exit codes: 0 success, 1 the input or the result fails its checks, 2 usage errors.
Each sub-command lives in its own section below and calls the public API; no science is done here.
"""

from __future__ import annotations

import typer

from carnk_pkpd import __version__

app = typer.Typer(
    name="carnk-pkpd",
    help="Population PK/PD of allogeneic CD19 CAR-NK cells in SLE: validate cohorts, simulate, fit, "
    "predict remission, rank doses, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"carnk-pkpd {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """carnk-pkpd command line."""


# --- validate (data) --------------------------------------------------------------------------------


_VALIDATE_FILES = typer.Argument(
    ..., metavar="FILE", help="Cohort CSV files (comma, semicolon or tab separated) to check."
)


@app.command("validate")
def validate_cmd(files: list[str] = _VALIDATE_FILES) -> None:
    """Check cohort files: print each one's summary, or every problem found (exit 1).

    Problems are printed to stderr as FILE:ROW:COLUMN: message; warnings as "warning: ...".
    """
    import warnings

    from rich.console import Console

    from carnk_pkpd.data import read_cohort, render_summary
    from carnk_pkpd.errors import DataError

    console = Console()
    failed = 0
    for file in files:
        problems: list = []
        cohort = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cohort = read_cohort(file)
            except DataError as exc:
                problems = exc.problems
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        if cohort is None:
            failed += 1
            for p in problems:
                typer.echo(str(p), err=True)
            typer.echo(f"{file}: {len(problems)} problem(s) found", err=True)
            continue
        render_summary(cohort, console)
    if failed:
        raise typer.Exit(1)


# --- simulate (structural) ---------------------------------------------------------------------------

# --- fit (inference) ---------------------------------------------------------------------------------

# --- predict (remission) -----------------------------------------------------------------------------

# --- doses (dose selection) --------------------------------------------------------------------------

# --- export / report ---------------------------------------------------------------------------------

# --- demo --------------------------------------------------------------------------------------------


@app.command("demo")
def demo_cmd() -> None:
    """Show the package on its embedded SYNTHETIC example cohort (simulated numbers, not trial data)."""
    from rich.console import Console

    from carnk_pkpd.data import embedded_cohort_path, read_cohort, render_summary

    console = Console()
    cohort = read_cohort(embedded_cohort_path("example"))
    console.rule("[bold red]SYNTHETIC demo: simulated numbers, not trial data")
    render_summary(cohort, console)


def main() -> None:
    """Console-script entry point."""
    app()
