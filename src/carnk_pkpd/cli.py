"""The ``carnk-pkpd`` command line (typer for arguments, rich for tables and progress).

One error contract for every command:

* exit 0: success;
* exit 1: bad input: a cohort file, a fit folder, a model (name or file), a grid, a file that would be
  lost by writing (see :mod:`carnk_pkpd.atomic`), or a result that fails its checks (``--strict``);
* exit 2: usage: an unknown option, a malformed or out-of-range option value;
* exit 130: interrupted (Ctrl-C); temporary output is removed, earlier results are untouched.

Every message starts with ``Error:`` and names the file (with row/column or key where it applies); no
input a user can give ends in a traceback. Each sub-command lives in its own section below and calls
the public API; no science is done here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


# --- shared: errors, warnings, progress lines --------------------------------------------------------


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``Error: message`` to stderr; the caller raises the returned exit (1 bad input, 2 usage)."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def _usage_error(message: str) -> typer.Exit:
    """Print ``Error: message`` to stderr; the caller raises the returned exit code 2."""
    return _fail(message, 2)


def _check_number(option: str, value: float, *, low: float = 0.0, strict: bool = False) -> None:
    """Exit 2 unless ``value`` is finite and ``>= low`` (``> low`` when ``strict``)."""
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise _usage_error(f"{option} must be a number {'>' if strict else '>='} {low:g} (found {value:g})")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning, ResourceWarning)


@contextmanager
def _warnings_table(title: str = "Warnings") -> Iterator[list]:
    """Collect warnings raised inside (data warnings, BSV identifiability, numerical warnings) and print
    them once, as one short table on stderr, instead of Python's one-per-line warnings with source lines.
    Library deprecation notices are dropped."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in _NOISE:
            warnings.simplefilter("ignore", category)
        try:
            yield caught
        except KeyboardInterrupt:
            raise  # the interrupt message is the only line then
        except BaseException:
            _print_warnings(caught, title)
            raise
        _print_warnings(caught, title)


def _print_warnings(caught: list, title: str, limit: int = 8) -> None:
    from rich.table import Table

    seen: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for w in caught:
        text = str(w.message).strip()
        seen[text] = seen.get(text, 0) + 1
        kinds[text] = w.category.__name__.removesuffix("Warning") or "Warning"
    if not seen:
        return
    table = Table(title=f"{title} ({sum(seen.values())})", title_justify="left", show_lines=False)
    table.add_column("kind", no_wrap=True)
    table.add_column("warning", overflow="fold")
    for text in list(seen)[:limit]:
        n = seen[text]
        table.add_row(kinds[text], text + (f" (x{n})" if n > 1 else ""))
    if len(seen) > limit:
        table.add_row("", f"... and {len(seen) - limit} more (run 'carnk-pkpd validate FILE' to list all)")
    _stderr_console().print(table)


@contextmanager
def _step(console, text: str) -> Iterator[None]:
    """A progress line for work that takes more than a moment: a spinner on a terminal, else one line."""
    if console.is_terminal:
        with console.status(text):
            yield
    else:
        console.print(f"{text} ...")
        yield


def _load_fit_or_exit(folder: str):
    """Load a fit folder, or print ``Error: ...`` and exit 1 when it is missing or damaged."""
    from carnk_pkpd.errors import FitError
    from carnk_pkpd.fits import load_fit

    try:
        return load_fit(folder)
    except FitError as exc:
        raise _fail(str(exc), 1) from None


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


def _parse_dvids(text: str) -> tuple[int, ...]:
    """``"1,2"`` → ``(1, 2)``; only the concentration measures 1, 2 and 3."""
    out: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        if item not in ("1", "2", "3"):
            raise ValueError(
                f"--dvids: {item!r} is not a measure to simulate (expected a comma-separated subset of 1, 2, 3: "
                "1 CAR-NK flow, 2 B cells, 3 CAR qPCR; clinical scores 10-12 are always written)"
            )
        if int(item) in out:
            raise ValueError(f"--dvids: {item} given twice (found {text!r})")
        out.append(int(item))
    return tuple(out)


@app.command("simulate")
def simulate_cmd(
    out: str = typer.Option(
        ..., "--out", help="Cohort CSV to write (an earlier 'simulate' output is replaced; nothing else is)."
    ),
    model: str = typer.Option("reference", "--model", help="Model name (e.g. reference) or a .toml path."),
    dose_levels: str | None = typer.Option(
        None,
        "--dose-levels",
        help='Subjects per dose level "1:1,2:1,3:5,4:13", or labels "1,2,3,4" with --n-subjects; '
        "default: the model file's mix (scaled to --n-subjects when given).",
    ),
    n_subjects: int | None = typer.Option(None, "--n-subjects", help="Number of virtual subjects."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same file."),
    dvids: str = typer.Option("1,2", "--dvids", help="Measures: 1 CAR-NK flow, 2 B cells, 3 CAR qPCR."),
    follow_up: float | None = typer.Option(
        None, "--follow-up", help="Follow-up in days for every subject (default: drawn like the trial)."
    ),
) -> None:
    """Simulate a SYNTHETIC cohort from a model file and write it in the cohort data format.

    Sampling schedules, residual errors, BLQ censoring and DORIS/LLDAS/SLEDAI-2K visits follow
    science.md §4; the file starts with a "# SYNTHETIC" comment. Exit 2 on bad options.
    """
    from pathlib import Path

    from rich.console import Console

    from carnk_pkpd.atomic import check_output_files, output_files
    from carnk_pkpd.cohortsim import parse_dose_levels, simulate_cohort
    from carnk_pkpd.data import read_cohort, render_summary, write_cohort
    from carnk_pkpd.errors import DataError, ModelFileError, OutputRefused
    from carnk_pkpd.spec import ModelFileProblems, load_model

    try:
        wanted_dvids = _parse_dvids(dvids)
        levels = parse_dose_levels(dose_levels) if dose_levels is not None else None
    except ValueError as exc:
        raise _usage_error(str(exc)) from None
    if n_subjects is not None and n_subjects < 1:
        raise _usage_error(f"--n-subjects must be >= 1 (found {n_subjects})")
    if follow_up is not None and not (follow_up > 0 and follow_up < float("inf")):
        raise _usage_error(f"--follow-up must be a number of days > 0 (found {follow_up})")
    target = Path(out)
    if target.is_dir():
        raise _usage_error(f"--out {out} is a folder (expected a file name such as cohort.csv)")
    if not target.parent.is_dir():
        raise _usage_error(f"--out {out}: folder {target.parent} does not exist")
    try:
        check_output_files(target.parent, [target.name], command="simulate")
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    try:
        spec = load_model(model)
    except ModelFileProblems as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except (ModelFileError, OSError) as exc:
        raise _fail(f"--model {model}: {exc}", 1) from None
    try:
        with (
            _warnings_table(),
            _step(Console(stderr=True), f"simulating a SYNTHETIC cohort from model {spec.name}"),
        ):
            cohort, _ = simulate_cohort(
                spec, levels, n_subjects, seed, dvids=wanted_dvids, follow_up=follow_up
            )
    except ModelFileError as exc:  # the model file cannot be simulated: bad input, not usage
        raise _fail(str(exc), 1) from None
    except ValueError as exc:
        raise _usage_error(str(exc)) from None
    try:
        with output_files(target.parent, command="simulate") as tmp:
            write_cohort(cohort, tmp / target.name)
        path = target
        written = read_cohort(path)
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    except (OSError, DataError) as exc:
        raise _fail(f"could not write {out}: {exc}", 1) from None
    console = Console()
    render_summary(written, console)
    console.print(
        f"[bold red]SYNTHETIC[/]: wrote {path} ({len(written.subjects)} simulated subjects, model "
        f"{spec.name}, seed {seed}); not trial data."
    )


# --- fit (inference) ---------------------------------------------------------------------------------


def run_fit(
    data: str,
    model: str,
    out: str,
    draws: int,
    tune: int,
    chains: int,
    seed: int,
    overwrite: bool,
    console,
    target_accept: float | None = None,
):
    """Fit, show diagnostics and the summary, save atomically; returns the Fit (shared with demo).

    The output folder is checked against the output rule before any work (an existing fit needs
    ``overwrite``; a folder that is not a fit is never replaced).
    """
    import time
    from pathlib import Path

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from carnk_pkpd.atomic import check_folder_output
    from carnk_pkpd.diagnostics import render_diagnostics
    from carnk_pkpd.fits import save_fit
    from carnk_pkpd.inference import TARGET_ACCEPT
    from carnk_pkpd.inference import fit as fit_model
    from carnk_pkpd.progress import sampler_status

    dest = Path(out)
    check_folder_output(dest, "fit", command="fit", overwrite=overwrite, needs_overwrite=True)
    live = console.is_terminal
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("reading data", total=None)
        state = {"t0": None, "shown": -1}

        def on_stage(text: str) -> None:
            bar.update(task, description=text)
            if not live:
                console.print(f"fit: {text}")

        def on_progress(chain_progress: list) -> None:
            if state["t0"] is None:
                state["t0"] = time.perf_counter()
            st = sampler_status(chain_progress, state["t0"])
            bar.update(task, description=st.describe(), completed=st.done, total=max(st.total, 1))
            tenth = int(10 * st.done / max(st.total, 1))
            if not live and tenth > state["shown"]:
                state["shown"] = tenth
                console.print(f"fit: {st.describe()}")

        result = fit_model(
            data,
            model,
            draws=draws,
            tune=tune,
            chains=chains,
            seed=seed,
            progress=False,
            on_stage=on_stage,
            on_progress=on_progress,
            target_accept=TARGET_ACCEPT if target_accept is None else target_accept,
        )
    t = result.manifest["timings"]
    n_div = result.diagnostics.to_dict().get("divergences") if result.diagnostics is not None else None
    console.print(
        f"compile {t['compile_seconds']:.1f} s, sampling {t['sampling_seconds']:.1f} s, "
        f"min bulk ESS per second {t['min_ess_bulk_per_second']}"
        + (f", {n_div} divergences" if n_div is not None else "")
    )
    if result.synthetic:
        console.print(
            "[bold red]SYNTHETIC data: every estimate below describes simulated patients.[/bold red]"
        )
    _print_summary(result, console)
    render_diagnostics(result.diagnostics, console)
    with _step(console, f"saving the fit to {dest}"):
        path = save_fit(result, dest, overwrite=overwrite)
    console.print(f"saved fit to {path}/ (posterior.nc, model.toml, data.csv, summary.csv, manifest.json)")
    return result


def _print_summary(result, console) -> None:
    """The posterior summary, readable at 80 columns: names are never cut (units fold instead)."""
    from rich import box
    from rich.table import Table

    df = result.summary()
    width = max([len("name"), *(len(str(n)) for n in df["name"])])
    table = Table(title="Population parameters (posterior)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=width)
    table.add_column("unit", overflow="fold", max_width=14)
    for col in ("median", "90% interval", "ESS", "R-hat"):
        table.add_column(col, justify="right", no_wrap=True)
    for _, r in df.iterrows():
        table.add_row(
            str(r["name"]),
            str(r["unit"]),
            f"{r['q50']:.3g}",
            f"{r['q05']:.3g}-{r['q95']:.3g}",
            f"{r['ess_bulk']:.0f}" if math.isfinite(r["ess_bulk"]) else "-",
            f"{r['r_hat']:.2f}" if math.isfinite(r["r_hat"]) else "-",
        )
    console.print(table)
    console.print("median and 90% interval; omega_* are BSV SDs (log scale), sigma_* residual SDs")


@app.command("fit")
def fit_cmd(
    data: str = typer.Argument(..., help="Cohort CSV (NONMEM-style, see 'carnk-pkpd validate')."),
    model: str = typer.Option("reference", "--model", help="Model name (e.g. reference) or a .toml path."),
    out: str = typer.Option(..., "--out", help="Fit folder to write, e.g. fits/run1 (written atomically)."),
    draws: int = typer.Option(1000, "--draws", min=1, help="Posterior draws per chain."),
    tune: int = typer.Option(1000, "--tune", min=0, help="Warm-up iterations per chain."),
    chains: int = typer.Option(4, "--chains", min=1, help="Number of chains."),
    seed: int = typer.Option(1, "--seed", help="Sampler seed (same seed, same draws on the same machine)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier fit in --out (never a folder that is not a fit)."
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the fit fails its diagnostics."),
    target_accept: float = typer.Option(
        None, "--target-accept", min=0.5, max=0.999, help="NUTS target acceptance (default: carnk_pkpd's)."
    ),
) -> None:
    """Fit the hierarchical model to a cohort with NUTS (nutpie) and save the fit folder."""
    from rich.console import Console

    from carnk_pkpd.errors import DataError, ModelFileError, OutputRefused

    console = Console()
    try:
        with _warnings_table("Warnings about the data and the fit"):
            result = run_fit(data, model, out, draws, tune, chains, seed, overwrite, console, target_accept)
    except DataError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    except (ModelFileError, OutputRefused, ValueError) as e:
        raise _fail(str(e), 1) from None
    except OSError as e:
        raise _fail(f"{e.filename or out}: {e.strerror or e}", 1) from None
    if strict and not result.diagnostics.ok:
        typer.echo("Error: the fit fails its diagnostics (--strict)", err=True)
        raise typer.Exit(1)


# --- predict (remission) -----------------------------------------------------------------------------


def _predict_fail(message: str, code: int) -> typer.Exit:
    """Print ``Error: message`` to stderr and return the exit (2 usage, 1 bad input)."""
    return _fail(message, code)


def _max_visit_day(spec) -> float:  # noqa: ANN001 - ModelSpec
    """The last day the model simulates clinical visits (``simulation.clinical_days`` and
    ``bcell_days_extended``): predictions beyond it would extrapolate the remission link."""
    sim = getattr(spec, "simulation", {}) or {}
    days = [float(d) for k in ("clinical_days", "bcell_days_extended") for d in (sim.get(k) or [])]
    return max([365.0, *days])


@app.command("predict")
def predict_cmd(
    fit_dir: str = typer.Argument(..., metavar="FIT", help="Fit folder written by 'carnk-pkpd fit'."),
    dose: float | None = typer.Option(
        None, "--dose", help="10⁹ CAR-NK cells per infusion; omit for every dose level."
    ),
    interval: float = typer.Option(3.0, "--interval", help="Days between infusions."),
    infusions: int = typer.Option(3, "--infusions", help="Number of infusions."),
    ld_scale: float = typer.Option(1.0, "--ld-scale", help="Lymphodepletion kill scale (1 = Cy/Flu)."),
    visits: str = typer.Option("180,365", "--visits", help="Visit days, comma-separated."),
    out: str = typer.Option(
        ".", "--out", help="Folder for remission.csv (created if missing; default: current folder)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    n_patients: int = typer.Option(100, "--patients", help="Virtual patients per posterior draw."),
    published: str | None = typer.Option(
        None, "--published", help="Add published counts (e.g. models/published_counts.toml); double-counts."
    ),
) -> None:
    """Predict P(DORIS) and P(LLDAS) for a new patient (median, 90% interval) and write remission.csv.

    The remission link is fitted once and stored in the fit folder (remission.nc). Without --dose,
    predictions are made for each of the model file's dose levels. Exit 2 on bad options, 1 on a bad
    fit folder.
    """
    from pathlib import Path

    from rich.console import Console

    from carnk_pkpd.atomic import check_output_files, output_files
    from carnk_pkpd.errors import FitError, OutputRefused
    from carnk_pkpd.provenance import provenance_lines, write_csv
    from carnk_pkpd.regimen import Regimen
    from carnk_pkpd.remission import run_predict

    try:
        days = [float(v) for v in visits.split(",") if v.strip()]
    except ValueError:
        raise _predict_fail(
            f"--visits: expected comma-separated days such as 180,365 (found {visits!r})", 2
        ) from None
    if not days or any(not (d > 0) for d in days):
        raise _predict_fail(f"--visits: days must be > 0 (found {visits!r})", 2)
    regimen = None
    if dose is not None:
        try:
            regimen = Regimen(dose, interval, infusions, ld_scale)
        except ValueError as exc:
            raise _predict_fail(str(exc), 2) from None
    if n_patients < 1:
        raise _predict_fail(f"--patients must be >= 1 (found {n_patients})", 2)
    out_dir = Path(out)
    try:
        check_output_files(out_dir, ["remission.csv"], command="predict")
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    if published is not None and not Path(published).is_file():
        raise _predict_fail(f"--published {published}: file not found", 1)
    fit = _load_fit_or_exit(fit_dir)
    horizon = _max_visit_day(fit.spec)
    if any(d > horizon for d in days):
        raise _predict_fail(
            f"--visits: day {max(days):g} is beyond the last visit the model simulates (day {horizon:g}: "
            f"simulation.clinical_days and bcell_days_extended in {fit.path}/model.toml); choose visits up to "
            f"day {horizon:g}",
            2,
        )
    console = Console()
    tag = "[bold red]SYNTHETIC[/] " if fit.synthetic else ""
    try:
        with _warnings_table(), _step(console, "predicting remission (fits the remission link once per fit)"):
            table, ds = run_predict(fit, regimen, days, n_patients, seed, published=published)
    except (ValueError, FitError) as exc:
        raise _predict_fail(str(exc), 1) from None
    except OSError as exc:
        raise _predict_fail(f"{exc.filename or fit_dir}: {exc.strerror or exc}", 1) from None
    title = f"{tag}Remission for a new patient" + (f": {regimen.label}" if regimen else ", by dose level")
    _show_prediction(console, ds, table, title, published)
    target = out_dir / "remission.csv"
    try:
        with output_files(out_dir, command="predict") as tmp:
            write_csv(
                table, tmp / "remission.csv", provenance_lines(fit, command="predict"), float_format="%.6g"
            )
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _predict_fail(f"could not write {target}: {exc.strerror or exc}", 1) from None
    console.print(f"{tag}wrote {target}")


def _show_prediction(console, ds, table, title, published) -> None:  # noqa: ANN001
    from rich.table import Table

    # compact display (the CSV keeps every column): regimen as '3 x 2e9 q3d', interval in brackets
    rich_table = Table(title=title)
    shown = (["dose_level"] if "dose_level" in table else []) + [
        "endpoint",
        "day",
        "regimen",
        "median",
        "90% interval",
        "mean",
    ]
    for c in shown:
        rich_table.add_column(c, justify="left" if c in ("endpoint", "dose_level", "regimen") else "right")
    for r in table.to_dict("records"):
        ld = "" if float(r["ld_scale"]) == 1.0 else f" LD x{float(r['ld_scale']):g}"
        regimen = f"{int(r['n_infusions'])} x {float(r['dose']):g}e9 q{float(r['interval']):g}d{ld}"
        cells = [
            str(r["endpoint"]),
            f"{float(r['day']):g}",
            regimen,
            f"{r['median']:.2f}",
            f"[{r['q05']:.2f}, {r['q95']:.2f}]",
            f"{r['mean']:.2f}",
        ]
        rich_table.add_row(*(([str(r["dose_level"])] if "dose_level" in r else []) + cells))
    console.print(rich_table)
    console.print(
        f"median and 90% interval of the population probability (parameter uncertainty); mean = predictive "
        f"probability; metric {ds.attrs.get('metric')}"
        + ("; published counts added (double-counts trial patients)" if published else "")
    )
    for key in ("diagnostics", "concordance"):  # the remission link's sampler check and its PPC
        if ds.attrs.get(key):
            console.print(str(ds.attrs[key]))


# --- doses (dose selection) --------------------------------------------------------------------------


_DOSES_FIT = typer.Argument(..., help="Fit folder written by 'carnk-pkpd fit', e.g. fits/run1.")


@app.command("doses")
def doses_cmd(
    fit_dir: str = _DOSES_FIT,
    grid: str | None = typer.Option(
        None, "--grid", help="Regimens: a YAML file, or DOSE:INTERVAL:N[:LD],... (10⁹ cells, days)."
    ),
    out: str | None = typer.Option(
        None, "--out", help="A new output folder (default doses/<fit name>; e.g. FIT/doses)."
    ),
    draws: int = typer.Option(200, "--draws", min=1, help="Posterior draws."),
    patients: int = typer.Option(40, "--patients", min=1, help="New virtual patients per draw."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same results for any workers)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Dask scheduler address."),
    workers: int = typer.Option(
        2, "--workers", min=0, help="Local Dask worker processes, one CPU each; 0 = no Dask."
    ),
    da_target: float = typer.Option(45.0, "--da-target", help="Target aplasia duration (days)."),
    w_remission: float = typer.Option(1.0, "--w-remission", help="Utility weight on P(DORIS at 12 mo)."),
    w_safety: float = typer.Option(0.1, "--w-safety", help="Utility weight on P(Cmax > threshold)."),
    w_cells: float = typer.Option(0.01, "--w-cells", help="Utility weight per 10⁹ cells given."),
    cmax_threshold: float = typer.Option(100.0, "--cmax-threshold", help="Safety proxy (CAR-NK cells/µL)."),
    top: int = typer.Option(10, "--top", min=1, help="Rows of the ranking to print."),
    assumed_link: bool = typer.Option(
        False, "--assumed-link", help="Use the model file's ASSUMED remission link instead of the fitted one."
    ),
) -> None:
    """Rank dosing regimens by simulated remission, target attainment and safety (writes ranking.csv).

    --out is a new folder, or this command's own earlier output (replaced); never a fit folder or a
    folder carnk-pkpd did not create. Exit 2 on out-of-range options, 1 on a bad fit folder or grid.
    """
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from carnk_pkpd.atomic import check_folder_output
    from carnk_pkpd.doses import GridError, Utility, load_grid, run_search, write_results
    from carnk_pkpd.errors import FitError, OutputRefused
    from carnk_pkpd.provenance import provenance

    for option, value in (("--w-remission", w_remission), ("--w-safety", w_safety), ("--w-cells", w_cells)):
        _check_number(option, value)
    _check_number("--da-target", da_target, strict=True)
    _check_number("--cmax-threshold", cmax_threshold, strict=True)
    console = Console()
    fit = _load_fit_or_exit(fit_dir)
    dest = Path(out) if out else Path("doses") / Path(fit_dir).name
    try:
        check_folder_output(dest, "doses", command="doses")
    except OutputRefused as e:
        raise _fail(str(e), 1) from None
    try:
        regimens = load_grid(grid) if grid else None
    except (FitError, GridError) as e:
        raise _fail(str(e), 1) from None
    except OSError as e:
        raise _fail(f"--grid {grid}: cannot be read ({e.strerror or e})", 1) from None
    except (ValueError, TypeError) as e:
        raise _fail(f"--grid {grid}: {e}", 1) from None
    utility = Utility(w_remission, w_safety, w_cells, cmax_threshold)
    try:
        with _warnings_table():
            if scheduler or workers > 0:
                import logging

                logging.getLogger("distributed").setLevel(logging.ERROR)  # no worker chatter in the output
            with Progress(
                TextColumn("simulating regimens"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("doses", total=None)

                shown = [-1]

                def tick(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)
                    tenth = int(10 * done / max(total, 1))
                    if not console.is_terminal and tenth > shown[0]:  # a log gets a line every 10%
                        shown[0] = tenth
                        console.print(f"doses: simulated {done}/{total} regimen batches")

                ds = run_search(
                    fit,
                    regimens,
                    n_draws=draws,
                    n_patients=patients,
                    seed=seed,
                    utility=utility,
                    da_target=da_target,
                    assumed_link=assumed_link,
                    scheduler=scheduler,
                    workers=workers,
                    progress=tick,
                )
            ds.attrs.update(provenance(fit, command="doses"))
            with _step(console, f"writing {dest}/ (ranking.csv, doses.nc, plots)"):
                write_results(ds, dest)
    except OutputRefused as e:
        raise _fail(str(e), 1) from None
    except (ValueError, GridError) as e:
        raise _fail(str(e), 1) from None
    except OSError as e:
        raise _fail(f"{e.filename or dest}: {e.strerror or e}", 1) from None
    from rich import box
    from rich.table import Table

    from carnk_pkpd.doses import ranking_table, tie_statement

    syn = "SYNTHETIC — " if fit.synthetic else ""
    table = Table(title=f"{syn}top regimens", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = [
        ("#", "rank"),
        ("regimen", "regimen"),
        ("DORIS 12m", "p_doris_12m"),
        ("LLDAS 12m", "p_lldas_12m"),
        ("DA≥target", "pta_da"),
        ("Cmax>thr", "p_cmax_high"),
        ("P(best)", "p_best"),
        ("utility", "utility"),
    ]
    wide = console.width >= 120  # intervals fit beside the medians; at 80 columns medians only
    for name, key in cols:
        table.add_column(name, no_wrap=key == "regimen", justify="left" if key == "regimen" else "right")
    full = ranking_table(ds)
    df = full.head(top)
    for _, row in df.iterrows():
        cells = []
        for _, key in cols:
            if key in ("rank", "regimen"):
                cells.append(str(row[key]))
            elif key in ("p_best", "utility"):
                cells.append(f"{row[key]:.3f}")
            else:
                interval = f" [{row[key + '_q05']:.2f}, {row[key + '_q95']:.2f}]" if wide else ""
                cells.append(f"{row[key + '_median']:.2f}{interval}")
        table.add_row(*cells)
    console.print(table)
    console.print(
        "probabilities: median"
        + (" and [90% interval]" if wide else " (90% intervals in ranking.csv)")
        + " over posterior draws; DA≥target = P(aplasia lasts at least "
        f"--da-target days); Cmax>thr = P(CAR-NK Cmax > --cmax-threshold); {ds.attrs['utility']}"
    )
    console.print(
        "Monte Carlo error: every median has a *_median_mcse column in ranking.csv, P(best) p_best_mcse"
    )
    tie = tie_statement(full)
    if tie:
        console.print(f"[yellow]{tie}[/yellow]")
    console.print(f"remission: {ds.attrs['remission_source']}")
    for key in ("remission_diagnostics", "remission_concordance"):  # stage-2 sampler check and PPC
        if ds.attrs.get(key):
            console.print(str(ds.attrs[key]))
    console.print(f"wrote {dest}/ranking.csv and plots" + (" (SYNTHETIC fit)" if fit.synthetic else ""))


# --- export / report ---------------------------------------------------------------------------------


@app.command("export")
def export_cmd(
    fit_dir: str = typer.Argument(..., metavar="FIT", help="Fit folder written by 'carnk-pkpd fit'."),
    fmt: str = typer.Option("csv", "--format", help="csv, json, md, tex or nc (posterior + predictive)."),
    out: str | None = typer.Option(
        None, "--out", help="Output folder (default FIT/export/; created if missing)."
    ),
    n_draws: int = typer.Option(200, "--draws", min=1, help="Posterior draws for predictions."),
    seed: int = typer.Option(0, "--seed", help="Seed for thinning draws and replicated data."),
    cwres: bool = typer.Option(
        True, "--cwres/--no-cwres", help="Compute CWRES (FOCE linearisation; ~30 s of compilation)."
    ),
) -> None:
    """Export parameter (THETA/OMEGA/SIGMA), per-subject and sdtab tables, or netCDF posteriors.

    Writes into FIT/export/ by default; --out may name a new folder or an existing one, where only new
    names or this command's own earlier files are written (never the fit's own files).
    """
    from rich.console import Console

    from carnk_pkpd.atomic import check_output_files
    from carnk_pkpd.errors import OutputRefused
    from carnk_pkpd.export import EXPORT_FILES, FORMATS, export_folder, write_export

    if fmt not in FORMATS:
        raise _usage_error(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    fit = _load_fit_or_exit(fit_dir)
    console = Console(stderr=True)
    try:
        check_output_files(export_folder(fit, out), EXPORT_FILES[fmt], command="export")
        with (
            _warnings_table(),
            _step(console, f"exporting ({fmt}; posterior predictive from {n_draws} draws)"),
        ):
            paths = write_export(fit, fmt, out, n_draws=n_draws, seed=seed, cwres=cwres)
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _fail(f"could not export {fit_dir}: {exc.filename or ''} {exc.strerror or exc}", 1) from None
    except ValueError as exc:
        raise _fail(f"could not export {fit_dir}: {exc}", 1) from None
    if fit.synthetic:
        typer.echo("SYNTHETIC data: the exported estimates describe simulated patients.")
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command("report")
def report_cmd(
    fit_dir: str = typer.Argument(..., metavar="FIT", help="Fit folder written by 'carnk-pkpd fit'."),
    out: str | None = typer.Option(None, "--out", help="HTML file (default FIT/report.html)."),
    n_draws: int = typer.Option(100, "--draws", min=1, help="Posterior draws for predictions and VPC."),
    seed: int = typer.Option(0, "--seed", help="Seed for thinning draws and replicated data."),
    cwres: bool = typer.Option(
        True, "--cwres/--no-cwres", help="Compute CWRES (FOCE linearisation; ~30 s of compilation)."
    ),
) -> None:
    """Write one self-contained HTML report (tables, diagnostics, GOF, VPC, individual fits).

    An existing --out file is replaced only when it is an earlier report written by this command.
    """
    from rich.console import Console

    from carnk_pkpd.errors import OutputRefused
    from carnk_pkpd.report import report_path, write_report

    fit = _load_fit_or_exit(fit_dir)
    console = Console(stderr=True)
    try:
        report_path(fit, out)  # checks the output rule before the work
        with _warnings_table(), _step(console, f"writing the report (predictions from {n_draws} draws)"):
            path = write_report(fit, out, n_draws=n_draws, seed=seed, cwres=cwres)
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _fail(f"could not write the report of {fit_dir}: {exc.strerror or exc}", 1) from None
    except ValueError as exc:
        raise _fail(f"could not write the report of {fit_dir}: {exc}", 1) from None
    if fit.synthetic:
        typer.echo("SYNTHETIC data: the report describes simulated patients.")
    typer.echo(f"wrote {path}")


# --- compare -----------------------------------------------------------------------------------------


_COMPARE_FITS = typer.Argument(..., metavar="FIT FIT...", help="Two or more fit folders (same data).")


@app.command("compare")
def compare_cmd(
    fit_dirs: list[str] = _COMPARE_FITS,
    out: str | None = typer.Option(None, "--out", help="Folder to create for compare.csv (must not exist)."),
    by: str = typer.Option(
        "record",
        "--by",
        help="Leave one 'record' out, or one 'subject' out (its η integrated out: judges the "
        "population model, e.g. a dose-level tier or a covariate).",
    ),
    samples: int = typer.Option(
        200, "--samples", min=10, help="--by subject: importance samples per subject and draw."
    ),
    max_draws: int = typer.Option(400, "--max-draws", min=10, help="--by subject: posterior draws used."),
    seed: int = typer.Option(0, "--seed", help="--by subject: seed of the importance sampler."),
) -> None:
    """Rank fits of the same data by PSIS-LOO (elpd, SE, difference to the best and its SE, Pareto k)."""
    from rich.console import Console
    from rich.table import Table

    from carnk_pkpd.compare import compare_fits
    from carnk_pkpd.errors import FitError

    if by not in ("record", "subject"):
        typer.echo(f"Error: --by must be 'record' or 'subject' (found {by!r})", err=True)
        raise typer.Exit(2)
    fits = [_load_fit_or_exit(d) for d in fit_dirs]
    try:
        df = compare_fits(fits, out, unit=by, n_samples=samples, max_draws=max_draws, seed=seed)
    except (FitError, FileExistsError, OSError, ValueError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    console = Console()
    if df.attrs.get("synthetic"):
        console.print("[bold red]SYNTHETIC data: the fits describe simulated patients.")
    what = "record" if by == "record" else "subject, its η integrated out"
    table = Table(title=f"PSIS-LOO (leave one {what}; elpd in nats, higher is better)")
    cols = ["model", "rank", "elpd_loo", "se", "elpd_diff", "dse", "p_loo", "k_good", "k_bad", "k_very_bad"]
    heads = ["model", "rank", "elpd", "SE", "Δelpd", "SE Δ", "p_loo", "k ok", "k bad", "k > 1"]
    for c, h in zip(cols, heads, strict=True):
        table.add_column(h, justify="left" if c == "model" else "right")
    for row in df.itertuples(index=False):
        r = row._asdict()
        table.add_row(*(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    console.print(table)
    for row in df.itertuples(index=False):
        if row.warning:
            console.print(f"[yellow]warning: {row.model}: {row.warning}")
        if by == "subject":
            console.print(
                f"{row.model}: importance sampling ESS per subject and draw: min {row.is_ess_min:.0f}, "
                f"median {row.is_ess_median:.0f} of {samples}"
            )
    if out is not None:
        typer.echo(f"wrote {out}/compare.csv")


# --- sbc (simulation-based calibration; implementation in sbc.py) ----------------------------------


@app.command("sbc")
def sbc_cmd(
    model: str = typer.Option("reference", "--model", help="Model name (models/<name>.toml) or path."),
    n_cohorts: int = typer.Option(..., "--n-cohorts", min=1, help="Cohorts simulated from the prior."),
    out: str = typer.Option(..., "--out", help="Folder for ranks.csv, uniformity.csv, rank_histograms.png."),
    scheduler: str = typer.Option(
        None, "--scheduler", help="Dask scheduler address (default: a LocalCluster; 'sync': in-process)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the prior draws, cohorts and samplers."),
    design: str = typer.Option("1:1,2:1,3:5,4:13", "--design", help="Subjects per dose level."),
    follow_up: float = typer.Option(
        None, "--follow-up", min=1, help="Days for all (default: like the trial)."
    ),
    draws: int = typer.Option(200, "--draws", min=1, help="Posterior draws per chain."),
    tune: int = typer.Option(200, "--tune", min=0, help="Warm-up iterations per chain."),
    chains: int = typer.Option(2, "--chains", min=1, help="Chains per fit."),
    n_ranks: int = typer.Option(99, "--ranks", min=1, help="Thinned draws per rank (ranks 0..L)."),
    bins: int = typer.Option(10, "--bins", min=1, help="Histogram bins (must divide L + 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Simulation-based calibration: rank statistics of every population parameter over SYNTHETIC
    cohorts simulated from the prior, with a chi-square uniformity test (on Dask)."""
    from carnk_pkpd.errors import ModelFileError, OutputRefused
    from carnk_pkpd.sbc import SBCSettings, run_sbc

    settings = SBCSettings(
        n_cohorts=n_cohorts,
        seed=seed,
        design=design,
        follow_up=follow_up,
        draws=draws,
        tune=tune,
        chains=chains,
        n_ranks=n_ranks,
        bins=bins,
    )
    try:
        result = run_sbc(model, settings, out, scheduler=scheduler, overwrite=overwrite)
    except (ModelFileError, FileExistsError, ValueError, OutputRefused) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    table = result["uniformity"][["parameter", "n", "chi2", "df", "p_value"]]
    typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    typer.echo(f"fits with divergences or R-hat > 1.01: {result['fits_failing']} of {n_cohorts}")
    typer.echo(f"wrote {result['out']}/ (ranks.csv, uniformity.csv, rank_histograms.png); SYNTHETIC cohorts")


# --- demo --------------------------------------------------------------------------------------------


from collections.abc import Callable  # noqa: E402  (kept in this section: used by the demo steps only)
from typing import Any  # noqa: E402


def _demo_reference_cohort(console: Any, state: dict[str, Any]) -> None:
    """Step: read the embedded SYNTHETIC reference cohort and print its summary."""
    from carnk_pkpd.data import embedded_cohort_path, read_cohort, render_summary

    path = embedded_cohort_path("reference")
    cohort = read_cohort(path)
    console.print(
        "The embedded reference cohort was simulated by carnk_pkpd (benchmarks/make_reference_cohort.py, "
        "models/reference.toml, seed 20241119): 20 virtual subjects at dose levels 1/1/5/13."
    )
    render_summary(cohort, console)
    state["cohort"] = cohort


def _demo_fit(console: Any, state: dict[str, Any]) -> None:
    """Step: a short fit of the reference cohort, saved to fits/demo (4 chains x 400 + 500 by default:
    two worker processes of two chains each on a 2-core machine). Measured with seed 1: 4 x (300 +
    300) gave a min bulk ESS of 363 and R-hat 1.011 (B0; benchmarks/bench_fit.py), 4 x (300 + 400)
    ESS 410 and R-hat 1.011 (B0; the demo), both just short of the checks' 400 and 1.01."""
    from carnk_pkpd.data import embedded_cohort_path

    settings = state.get("fit_settings", dict(draws=500, tune=400, chains=4, seed=1))
    console.print(
        f"Fitting the SYNTHETIC reference cohort: {settings['chains']} chains x ({settings['tune']} tune + "
        f"{settings['draws']} draws). A full fit is 'carnk-pkpd fit' with 4 x (1000 + 1000)."
    )
    state["fit"] = run_fit(
        str(embedded_cohort_path("reference")),
        "reference",
        "fits/demo",
        settings["draws"],
        settings["tune"],
        settings["chains"],
        settings["seed"],
        True,
        console,
    )
    state["fit_path"] = "fits/demo"


#: The demo's steps, in order: (title, function(console, state)). Each step reads what earlier steps
#: left in ``state`` (e.g. ``state["cohort"]``) and adds its own results; append steps here.
DEMO_STEPS: list[tuple[str, Callable[[Any, dict[str, Any]], None]]] = [
    ("SYNTHETIC reference cohort", _demo_reference_cohort),
    ("Hierarchical fit (short)", _demo_fit),
    (
        "Remission probability by dose level",
        lambda c, st: _demo_command(["predict", st["fit_path"], "--out", st["fit_path"]]),
    ),
    (
        "Dose selection: top of the ranking",
        lambda c, st: _demo_command(
            [
                "doses",
                st["fit_path"],
                "--out",
                f"{st['fit_path']}/doses",
                "--draws",
                "100",
                "--patients",
                "20",
                "--workers",
                "0",
                "--top",
                "6",
            ]
        ),
    ),
    ("Report", lambda c, st: _demo_command(["report", st["fit_path"]])),
]


def _demo_command(args: list[str]) -> None:
    """Run one carnk-pkpd command in-process (the demo shows exactly what a user would type)."""
    import typer.main

    typer.echo("$ carnk-pkpd " + " ".join(args))
    try:
        typer.main.get_command(app).main(args=args, prog_name="carnk-pkpd", standalone_mode=False)
    except typer.Exit as e:
        if e.exit_code:
            raise


@app.command("demo")
def demo_cmd() -> None:
    """Show the package on its embedded SYNTHETIC reference cohort (simulated numbers, not trial data)."""
    from rich.console import Console

    console = Console()
    console.rule("[bold red]SYNTHETIC demo: simulated numbers, not trial data")
    state: dict[str, Any] = {}
    from carnk_pkpd.errors import ModelFileError, OutputRefused

    for number, (title, step) in enumerate(DEMO_STEPS, start=1):
        console.rule(f"[bold]Step {number}: {title}")
        try:
            with _warnings_table():
                step(console, state)
        except (OutputRefused, ModelFileError) as exc:
            raise _fail(f"demo step {number} ({title}): {exc}", 1) from None
    console.rule("[bold red]End of the SYNTHETIC demo: every number above is simulated")


def _interrupted(command: str) -> None:
    """Ctrl-C: temporary output was removed while the stack unwound (context managers); exit 130 now,
    without waiting for worker threads (sampler, Dask) to finish the task they are running."""
    import os

    typer.echo(
        f"Interrupted: carnk-pkpd {command} stopped; its temporary output was removed and earlier results "
        "are untouched.",
        err=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


@app.command("vpc")
def vpc_cmd(
    fit_dir: str = typer.Argument(..., metavar="FIT", help="Fit folder written by 'carnk-pkpd fit'."),
    out: str | None = typer.Option(
        None, "--out", help="Output folder (default FIT/vpc/; created if missing)."
    ),
    by_dose_level: bool = typer.Option(False, "--by-dose-level", help="One VPC panel per dose level."),
    pc: bool = typer.Option(False, "--pc", help="Prediction-corrected VPC (Bergstrand et al. 2011)."),
    n_replicates: int = typer.Option(
        500, "--replicates", min=2, help="Replicates of new subjects (>= 500 for NPDE)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the replicates and of BLQ randomised ranks."),
) -> None:
    """VPC (or pcVPC) and NPDE from replicates of NEW subjects at each subject's observed design.

    Writes vpc.csv/vpc.png, npde.csv/npde_tests.csv/npde.png into FIT/vpc/ by default and prints the
    NPDE test of mean 0 / variance 1 per DVID.
    """
    from rich.console import Console

    from carnk_pkpd.atomic import check_output_files
    from carnk_pkpd.errors import OutputRefused
    from carnk_pkpd.evaluation import EVALUATION_FILES, evaluation_folder, write_evaluation

    fit = _load_fit_or_exit(fit_dir)
    console = Console(stderr=True)
    try:
        check_output_files(evaluation_folder(fit, out), EVALUATION_FILES, command="vpc")
        with _warnings_table(), _step(console, f"simulating {n_replicates} replicates of new subjects"):
            paths, tests = write_evaluation(
                fit, out, n_replicates=n_replicates, seed=seed, pc=pc, by_dose_level=by_dose_level
            )
    except OutputRefused as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _fail(
            f"could not write the VPC of {fit_dir}: {exc.filename or ''} {exc.strerror or exc}", 1
        ) from None
    except ValueError as exc:
        raise _fail(f"could not compute the VPC of {fit_dir}: {exc}", 1) from None
    if fit.synthetic:
        typer.echo("SYNTHETIC data: the VPC and NPDE describe simulated patients.")
    typer.echo("NPDE per DVID (expected mean 0, variance 1):")
    typer.echo(tests.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for p in paths:
        typer.echo(f"wrote {p}")


def main() -> None:
    """Console-script entry point: exit 130 with one line on Ctrl-C; one line, not a traceback, for an
    error nobody anticipated (set CARNK_PKPD_DEBUG=1 to see the traceback)."""
    import os

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    try:
        app()
    except SystemExit as e:
        if e.code == 130:  # typer turns KeyboardInterrupt into exit 130
            _interrupted(command)
        raise
    except KeyboardInterrupt:
        _interrupted(command)
    except Exception as e:  # noqa: BLE001 - last resort: the contract is one line, never a traceback
        if os.environ.get("CARNK_PKPD_DEBUG"):
            raise
        typer.echo(
            f"Error: unexpected {type(e).__name__} in carnk-pkpd {command}: {e} (this is a bug; rerun with "
            "CARNK_PKPD_DEBUG=1 for the traceback and report it)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":  # python -m carnk_pkpd.cli
    main()
