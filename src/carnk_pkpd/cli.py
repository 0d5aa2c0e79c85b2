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

# --- simulate (structural) ---------------------------------------------------------------------------

# --- fit (inference) ---------------------------------------------------------------------------------

# --- predict (remission) -----------------------------------------------------------------------------

# --- doses (dose selection) --------------------------------------------------------------------------

# --- export / report ---------------------------------------------------------------------------------

# --- demo --------------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()
