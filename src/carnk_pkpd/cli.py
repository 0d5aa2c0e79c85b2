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


def _usage_error(message: str) -> typer.Exit:
    """Print ``Error: message`` to stderr; the caller raises the returned exit code 2."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(2)


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
    out: str = typer.Option(..., "--out", help="Cohort CSV to write (replaced atomically if it exists)."),
    model: str = typer.Option("reference", "--model", help="Model name (models/<name>.toml) or path."),
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

    from carnk_pkpd.cohortsim import parse_dose_levels, simulate_cohort
    from carnk_pkpd.data import read_cohort, render_summary, write_cohort
    from carnk_pkpd.errors import DataError, ModelFileError
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
        spec = load_model(model)
    except ModelFileProblems as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except (ModelFileError, OSError) as exc:
        raise _usage_error(f"--model {model}: {exc}") from None
    try:
        cohort, _ = simulate_cohort(spec, levels, n_subjects, seed, dvids=wanted_dvids, follow_up=follow_up)
    except ValueError as exc:
        raise _usage_error(str(exc)) from None
    try:
        path = write_cohort(cohort, target)
        written = read_cohort(path)
    except (OSError, DataError) as exc:
        typer.echo(f"Error: could not write {out}: {exc}", err=True)
        raise typer.Exit(1) from None
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
    """Fit, show diagnostics and the summary, save atomically; returns the Fit (shared with demo)."""
    from pathlib import Path

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from carnk_pkpd.diagnostics import render_diagnostics
    from carnk_pkpd.fits import save_fit
    from carnk_pkpd.inference import TARGET_ACCEPT
    from carnk_pkpd.inference import fit as fit_model

    dest = Path(out)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass --overwrite to replace it")
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("reading data", total=None)
        result = fit_model(
            data,
            model,
            draws=draws,
            tune=tune,
            chains=chains,
            seed=seed,
            progress=False,
            on_stage=lambda s: bar.update(task, description=s),
            target_accept=TARGET_ACCEPT if target_accept is None else target_accept,
        )
    t = result.manifest["timings"]
    console.print(
        f"compile {t['compile_seconds']:.1f} s, sampling {t['sampling_seconds']:.1f} s, "
        f"min bulk ESS per second {t['min_ess_bulk_per_second']}"
    )
    if result.synthetic:
        console.print(
            "[bold red]SYNTHETIC data: every estimate below describes simulated patients.[/bold red]"
        )
    _print_summary(result, console)
    render_diagnostics(result.diagnostics, console)
    path = save_fit(result, dest, overwrite=overwrite)
    console.print(f"saved fit to {path}/ (posterior.nc, model.toml, data.csv, summary.csv, manifest.json)")
    return result


def _print_summary(result, console) -> None:
    from rich.table import Table

    df = result.summary()
    table = Table(title="Population parameters (posterior)")
    for col in ("name", "unit", "mean", "q05", "q50", "q95", "ess_bulk", "r_hat"):
        table.add_column(col, justify="left" if col in ("name", "unit") else "right")
    for _, r in df.iterrows():
        table.add_row(
            r["name"],
            r["unit"],
            f"{r['mean']:.4g}",
            f"{r['q05']:.4g}",
            f"{r['q50']:.4g}",
            f"{r['q95']:.4g}",
            f"{r['ess_bulk']:.0f}",
            f"{r['r_hat']:.3f}",
        )
    console.print(table)


@app.command("fit")
def fit_cmd(
    data: str = typer.Argument(..., help="Cohort CSV (NONMEM-style, see 'carnk-pkpd validate')."),
    model: str = typer.Option("reference", "--model", help="Model name (models/<name>.toml) or path."),
    out: str = typer.Option(..., "--out", help="Fit folder to write, e.g. fits/run1 (written atomically)."),
    draws: int = typer.Option(1000, "--draws", min=1, help="Posterior draws per chain."),
    tune: int = typer.Option(1000, "--tune", min=0, help="Warm-up iterations per chain."),
    chains: int = typer.Option(4, "--chains", min=1, help="Number of chains."),
    seed: int = typer.Option(1, "--seed", help="Sampler seed (same seed, same draws on the same machine)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing fit folder of that name."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the fit fails its diagnostics."),
    target_accept: float = typer.Option(
        None, "--target-accept", min=0.5, max=0.999, help="NUTS target acceptance (default: carnk_pkpd's)."
    ),
) -> None:
    """Fit the hierarchical model to a cohort with NUTS (nutpie) and save the fit folder."""
    from rich.console import Console

    from carnk_pkpd.errors import DataError, ModelFileError

    console = Console()
    try:
        result = run_fit(data, model, out, draws, tune, chains, seed, overwrite, console, target_accept)
    except DataError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    except (ModelFileError, FileExistsError, ValueError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    if strict and not result.diagnostics.ok:
        typer.echo("Error: the fit fails its diagnostics (--strict)", err=True)
        raise typer.Exit(1)


# --- predict (remission) -----------------------------------------------------------------------------


def _predict_fail(message: str, code: int) -> typer.Exit:
    """Print ``Error: message`` to stderr and return the exit (2 usage, 1 bad input)."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def _write_csv_atomic(df, path) -> None:  # noqa: ANN001 - pandas DataFrame, pathlib.Path
    """Write ``df`` to ``path`` via a temporary sibling file and ``os.replace``."""
    from carnk_pkpd.atomic import write_file_atomic

    write_file_atomic(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


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
    out: str = typer.Option(".", "--out", help="Folder for remission.csv (default: current folder)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    n_patients: int = typer.Option(20, "--patients", help="Virtual patients per posterior draw."),
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

    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from carnk_pkpd.errors import FitError
    from carnk_pkpd.fits import load_fit
    from carnk_pkpd.regimen import Regimen
    from carnk_pkpd.remission import predict_by_dose_level, predict_remission, prediction_table

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
    if not out_dir.is_dir():
        raise _predict_fail(f"--out {out}: not an existing folder", 2)
    if published is not None and not Path(published).is_file():
        raise _predict_fail(f"--published {published}: file not found", 2)
    if not Path(fit_dir).is_dir():
        raise _predict_fail(
            f"{fit_dir}: not a fit folder (expected a directory written by 'carnk-pkpd fit')", 2
        )
    try:
        fit = load_fit(fit_dir)
    except FitError as exc:
        raise _predict_fail(str(exc), 1) from None
    console = Console()
    tag = "[bold red]SYNTHETIC[/] " if fit.synthetic else ""
    try:
        if regimen is not None:
            ds = predict_remission(fit, regimen, days, n_patients, seed, published=published)
            table = prediction_table(ds, regimen)
            title = f"{tag}Remission for a new patient: {regimen.label}"
        else:
            ds = predict_by_dose_level(fit, days, n_patients, seed, published=published)
            parts = []
            for lab in ds["dose_level"].values:
                sub = ds.sel(dose_level=lab)
                reg = Regimen(float(sub["dose"]), float(sub["interval"]), int(sub["n_infusions"]), 1.0)
                parts.append(prediction_table(sub, reg).assign(dose_level=str(lab)))
            table = pd.concat(parts, ignore_index=True)
            title = f"{tag}Remission for a new patient, by dose level"
    except ValueError as exc:
        raise _predict_fail(str(exc), 1) from None
    cols = ["endpoint", "day", "median", "q05", "q95", "dose", "interval", "n_infusions", "ld_scale", "mean"]
    if "dose_level" in table:
        cols = ["dose_level", *cols]
    table = table[cols]
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
    target = out_dir / "remission.csv"
    try:
        _write_csv_atomic(table, target)
    except OSError as exc:
        raise _predict_fail(f"could not write {target}: {exc}", 1) from None
    console.print(f"{tag}wrote {target}")


# --- doses (dose selection) --------------------------------------------------------------------------


_DOSES_FIT = typer.Argument(..., help="Fit folder written by 'carnk-pkpd fit', e.g. fits/run1.")


@app.command("doses")
def doses_cmd(
    fit_dir: str = _DOSES_FIT,
    grid: str | None = typer.Option(
        None, "--grid", help="Regimens: a YAML file, or DOSE:INTERVAL:N[:LD],... (10⁹ cells, days)."
    ),
    out: str | None = typer.Option(None, "--out", help="Output folder (default doses/<fit name>)."),
    draws: int = typer.Option(200, "--draws", min=1, help="Posterior draws."),
    patients: int = typer.Option(40, "--patients", min=1, help="New virtual patients per draw."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same results for any workers)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Dask scheduler address."),
    workers: int = typer.Option(2, "--workers", min=0, help="Local Dask workers (threads); 0 = no Dask."),
    da_target: float = typer.Option(45.0, "--da-target", help="Target aplasia duration (days)."),
    w_remission: float = typer.Option(1.0, "--w-remission", help="Utility weight on P(DORIS at 12 mo)."),
    w_safety: float = typer.Option(0.1, "--w-safety", help="Utility weight on P(Cmax > threshold)."),
    w_cells: float = typer.Option(0.01, "--w-cells", help="Utility weight per 10⁹ cells given."),
    cmax_threshold: float = typer.Option(100.0, "--cmax-threshold", help="Safety proxy (CAR-NK cells/µL)."),
    top: int = typer.Option(10, "--top", min=1, help="Rows of the ranking to print."),
) -> None:
    """Rank dosing regimens by simulated remission, target attainment and safety (writes ranking.csv)."""
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from carnk_pkpd.doses import GridError, Utility, load_grid, rank_regimens, ranking_table, write_results
    from carnk_pkpd.errors import FitError
    from carnk_pkpd.fits import load_fit

    console = Console()
    try:
        fit = load_fit(fit_dir)
        regimens = load_grid(grid) if grid else None
    except (FitError, GridError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    utility = Utility(w_remission, w_safety, w_cells, cmax_threshold)
    dest = Path(out) if out else Path("doses") / Path(fit_dir).name
    remission = None
    rem_file = Path(fit_dir) / "remission.nc"
    if rem_file.exists():
        import xarray as xr

        with xr.open_dataset(rem_file) as f:
            remission = f.load()
    client = cluster = None
    try:
        if scheduler or workers > 0:
            from dask.distributed import Client, LocalCluster

            if scheduler:
                client = Client(scheduler)
            else:
                cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None
                )
                client = Client(cluster)
        with Progress(
            TextColumn("simulating regimens"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("doses", total=None)

            def tick(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            ds = rank_regimens(
                fit,
                regimens,
                n_draws=draws,
                n_patients=patients,
                seed=seed,
                utility=utility,
                client=client,
                da_target=da_target,
                remission=remission,
                progress=tick,
            )
        write_results(ds, dest)
    except (ValueError, OSError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    syn = "SYNTHETIC — " if fit.synthetic else ""
    table = Table(title=f"{syn}top regimens ({ds.attrs['utility']})")
    cols = [
        ("rank", "rank"),
        ("regimen", "regimen"),
        ("P(DORIS 12m)", "p_doris_12m"),
        ("P(LLDAS 12m)", "p_lldas_12m"),
        ("P(DA≥target)", "pta_da"),
        ("P(Cmax>thr)", "p_cmax_high"),
        ("P(best)", "p_best"),
        ("utility", "utility"),
    ]
    for name, _ in cols:
        table.add_column(name)
    df = ranking_table(ds).head(top)
    for _, row in df.iterrows():
        cells = []
        for _, key in cols:
            if key in ("rank", "regimen"):
                cells.append(str(row[key]))
            elif key in ("p_best", "utility"):
                cells.append(f"{row[key]:.3f}")
            else:
                cells.append(f"{row[key + '_median']:.2f} [{row[key + '_q05']:.2f}, {row[key + '_q95']:.2f}]")
        table.add_row(*cells)
    console.print(table)
    console.print(f"remission: {ds.attrs['remission_source']}")
    console.print(f"wrote {dest}/ranking.csv and plots" + (" (SYNTHETIC fit)" if fit.synthetic else ""))


# --- export / report ---------------------------------------------------------------------------------


def _load_fit_or_exit(folder: str):
    """Load a fit folder, or print ``Error: ...`` and exit 1 when it is missing or damaged."""
    from carnk_pkpd.errors import FitError
    from carnk_pkpd.fits import load_fit

    try:
        return load_fit(folder)
    except FitError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("export")
def export_cmd(
    fit_dir: str = typer.Argument(..., metavar="FIT", help="Fit folder written by 'carnk-pkpd fit'."),
    fmt: str = typer.Option("csv", "--format", help="csv, json, md, tex or nc (posterior + predictive)."),
    out: str | None = typer.Option(None, "--out", help="Output folder (default FIT/export/)."),
    n_draws: int = typer.Option(200, "--draws", min=1, help="Posterior draws for predictions."),
    seed: int = typer.Option(0, "--seed", help="Seed for thinning draws and replicated data."),
) -> None:
    """Export parameter (THETA/OMEGA/SIGMA), per-subject and sdtab tables, or netCDF posteriors."""
    from carnk_pkpd.export import FORMATS, write_export

    if fmt not in FORMATS:
        typer.echo(f"Error: --format {fmt!r} is not one of {', '.join(FORMATS)}", err=True)
        raise typer.Exit(2)
    fit = _load_fit_or_exit(fit_dir)
    try:
        paths = write_export(fit, fmt, out, n_draws=n_draws, seed=seed)
    except (OSError, ValueError) as exc:
        typer.echo(f"Error: could not export {fit_dir}: {exc}", err=True)
        raise typer.Exit(1) from None
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
) -> None:
    """Write one self-contained HTML report (tables, diagnostics, GOF, VPC, individual fits)."""
    from carnk_pkpd.report import write_report

    fit = _load_fit_or_exit(fit_dir)
    try:
        path = write_report(fit, out, n_draws=n_draws, seed=seed)
    except (OSError, ValueError) as exc:
        typer.echo(f"Error: could not write the report of {fit_dir}: {exc}", err=True)
        raise typer.Exit(1) from None
    if fit.synthetic:
        typer.echo("SYNTHETIC data: the report describes simulated patients.")
    typer.echo(f"wrote {path}")


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
    follow_up: float = typer.Option(None, "--follow-up", min=1, help="Days for all (default: like the trial)."),
    draws: int = typer.Option(200, "--draws", min=1, help="Posterior draws per chain."),
    tune: int = typer.Option(200, "--tune", min=0, help="Warm-up iterations per chain."),
    chains: int = typer.Option(2, "--chains", min=1, help="Chains per fit."),
    n_ranks: int = typer.Option(99, "--ranks", min=1, help="Thinned draws per rank (ranks 0..L)."),
    bins: int = typer.Option(10, "--bins", min=1, help="Histogram bins (must divide L + 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Simulation-based calibration: rank statistics of every population parameter over SYNTHETIC
    cohorts simulated from the prior, with a chi-square uniformity test (on Dask)."""
    from carnk_pkpd.errors import ModelFileError
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
    except (ModelFileError, FileExistsError, ValueError) as e:
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
    """Step: a short fit of the reference cohort, saved to fits/demo (4 chains x 300 + 300 by default:
    two worker processes of two chains each on a 2-core machine; 1,200 draws are what a bulk and tail
    ESS >= 400 needs at the ~0.4 ESS per draw of the slowest parameter; 2 x 200 + 200 gave ESS 98)."""
    from carnk_pkpd.data import embedded_cohort_path

    settings = state.get("fit_settings", dict(draws=300, tune=300, chains=4, seed=1))
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
    for number, (title, step) in enumerate(DEMO_STEPS, start=1):
        console.rule(f"[bold]Step {number}: {title}")
        step(console, state)
    console.rule("[bold red]End of the SYNTHETIC demo: every number above is simulated")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # python -m carnk_pkpd.cli
    main()
