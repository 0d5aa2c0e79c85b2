"""Dose selection: simulate virtual patients under candidate regimens and rank the regimens.

For each regimen, ``n_draws`` posterior draws each give ``n_patients`` new virtual patients, made by
the population layer (:func:`carnk_pkpd.population.individual_parameters`: dose-level tier, covariate
effects with DOSE following the regimen, Ω with fixed ω where the file fixes it) and solved on the one
solver-grid rule (:func:`carnk_pkpd.population.solver_rate_bounds`, default accuracy) with the
regimen's lymphodepletion window and intensity. Every population quantity (P(DORIS), P(LLDAS), target attainment, Cmax,
reconstitution day, ...) is computed per draw over that draw's patients; its 90% interval is the
5–95% quantiles across draws (parameter uncertainty). The best regimen of each draw is the argmax of
the utility, so ``p_best`` sums to 1 over regimens.

Work is split into (regimen, draw-chunk) tasks that run on Dask (or in-process when no client is
given). A chunk's random stream is ``SeedSequence(seed).spawn(...)[chunk]``: it depends on the seed and
the chunk index only (never on the worker), so results are identical for any number of workers. The
same chunk stream is used for every regimen (common random numbers: regimens are compared on the same
virtual patients, which makes the ranking and P(best) far less noisy).

Remission: one link source, :func:`carnk_pkpd.remission.remission_source` — the fitted stage-2 link
(fitted on demand and cached in the fit folder, the same one ``predict`` uses), or the model file's
link when the user asks for it (``assumed_link=True``, labelled ASSUMED in the output). Per-patient
metrics come from :func:`carnk_pkpd.structural.metrics.metrics_from_paths` (an event that never happens
is NaN) and reach the link through :func:`carnk_pkpd.remission.link_values` and
:func:`carnk_pkpd.remission.marginal_probabilities` (the patient effect integrated out by quadrature,
as ``predict``'s population probability), so P(DORIS) per draw carries no Monte Carlo noise from
patient effects, only from the virtual patients' exposures. Measured on the SYNTHETIC example fit
(40 draws x 160 patients, P(DORIS at 12 mo)): the Monte Carlo SD of the paired per-draw difference
between two regimens (same patients, same link draws) is 0.0052 at 40 patients per draw against an
across-draw SD of 0.032 (3x3e9 q3d vs 3x0.75e9 q7d), i.e. 2.6% of its variance (5.0% at 20, 1.3% at
80; 1.2% at 40 for 3x3e9 vs 3x2e9 q3d), so the command's default of 40 patients per draw is kept; the
remaining Monte Carlo error of the ranking is that of the draws (``p_best_mcse``, ``*_median_mcse``). Each kinetic draw is paired with a link
draw from the imputation fitted on that same draw where the fitted link has one
(:func:`carnk_pkpd.remission.select_draws`); other kinetic draws get a link draw from the whole pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from carnk_pkpd import xla
from carnk_pkpd.regimen import Regimen

__all__ = [
    "GridError",
    "Utility",
    "default_grid",
    "load_grid",
    "parse_grid",
    "patient_metrics",
    "rank_regimens",
    "ranking_table",
    "run_search",
    "write_results",
]

ACCURACY = "default"  # the solver accuracy of every prediction (structural.solve.ACCURACY)
MAX_SUBJECTS_PER_TASK = 2000  # draws per task = max(1, this // n_patients); fixed, not worker-dependent
HORIZON = 365.0  # days simulated after the first infusion
B_PLOT_TIMES = np.arange(0.0, HORIZON + 0.5, 5.0)  # days, median B trajectories
CAR_STEP = 0.25  # days between CAR-NK samples (closed form) for Cmax, Tmax, AUC and the plots
CAR_WINDOW = (0.0, 28.0)  # days, the window of car_cmax, car_tmax, car_auc_0_28 (as derived_metrics)
VISITS = {"6m": 180.0, "12m": 365.0}  # days


class GridError(ValueError):
    """A regimen grid (YAML file or command-line text) is wrong; the message names file and key."""


# --- regimens -----------------------------------------------------------------------------------------
def default_grid(spec: Any) -> list[Regimen]:
    """At least 12 regimens around the trial's dose levels, the four DLs first (10⁹ cells, days).

    Doses 0.5–4×10⁹ per infusion at the trial's two schedules (3 infusions q7d and q3d), one and two
    infusions at the top dose, and the DL4 schedule with half and no lymphodepletion.
    """
    dls = [Regimen(float(d.dose), float(d.interval), int(d.n_infusions)) for d in spec.dose_levels.values()]
    extra = [Regimen(dose, 7.0, 3) for dose in (0.5, 1.5, 2.0, 3.0)]
    extra += [Regimen(dose, 3.0, 3) for dose in (0.75, 1.0, 1.5, 4.0)]
    extra += [Regimen(3.0, 3.0, 1), Regimen(3.0, 3.0, 2), Regimen(3.0, 7.0, 2)]
    top = max(dls, key=lambda r: _total(r)) if dls else Regimen(3.0, 3.0, 3)
    extra += [Regimen(top.dose, top.interval, top.n_infusions, 0.5)]
    extra += [Regimen(top.dose, top.interval, top.n_infusions, 0.0)]
    out: list[Regimen] = []
    for r in dls + extra:
        if r not in out:
            out.append(r)
    return out


def _total(r: Regimen) -> float:
    """Cells over the whole regimen (10⁹)."""
    return float(r.dose) * int(r.n_infusions)


def _label(r: Regimen) -> str:
    """Short name, e.g. ``3x2e9 q3d`` or ``3x3e9 q3d LDx0.5`` (ld_scale ≠ 1)."""
    s = f"{int(r.n_infusions)}x{float(r.dose):g}e9 q{float(r.interval):g}d"
    return s if r.ld_scale == 1.0 else s + (" noLD" if r.ld_scale == 0 else f" LDx{r.ld_scale:g}")


_KEYS = ("dose", "interval", "n_infusions", "ld_scale")


def _regimen_from(where: str, key: str, item: Any) -> Regimen:
    if not isinstance(item, Mapping):
        raise GridError(f"{where}: {key}: expected a mapping with keys {list(_KEYS)}, found {item!r}")
    unknown = sorted(set(item) - set(_KEYS))
    if unknown:
        raise GridError(f"{where}: {key}.{unknown[0]}: unknown key (allowed: {', '.join(_KEYS)})")
    for k in _KEYS[:3]:
        if k not in item:
            raise GridError(f"{where}: {key}.{k}: missing (a regimen needs dose, interval, n_infusions)")
    for k, v in item.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise GridError(f"{where}: {key}.{k}: expected a number, found {v!r}")
    try:
        return Regimen(
            float(item["dose"]),
            float(item["interval"]),
            item["n_infusions"],
            float(item.get("ld_scale", 1.0)),
        )
    except ValueError as e:
        bad = next((k for k in _KEYS if k in str(e).split()[0]), "")
        raise GridError(f"{where}: {key}{'.' + bad if bad else ''}: {e}") from None


def parse_grid(data: Any, where: str = "<grid>") -> list[Regimen]:
    """Regimens from parsed YAML: ``{regimens: [{dose, interval, n_infusions, ld_scale?}, ...]}``
    and/or a product ``{grid: {dose: [...], interval: [...], n_infusions: [...], ld_scale: [...]}}``."""
    if not isinstance(data, Mapping):
        raise GridError(f"{where}: expected a mapping with 'regimens' and/or 'grid' at the top level")
    unknown = sorted(set(data) - {"regimens", "grid"})
    if unknown:
        raise GridError(f"{where}: {unknown[0]}: unknown key (allowed: regimens, grid)")
    out: list[Regimen] = []
    regs = data.get("regimens", [])
    if not isinstance(regs, list):
        raise GridError(f"{where}: regimens: expected a list of mappings")
    for i, item in enumerate(regs):
        out.append(_regimen_from(where, f"regimens[{i}]", item))
    if "grid" in data:
        g = data["grid"]
        if not isinstance(g, Mapping):
            raise GridError(f"{where}: grid: expected a mapping of lists")
        unknown = sorted(set(g) - set(_KEYS))
        if unknown:
            raise GridError(f"{where}: grid.{unknown[0]}: unknown key (allowed: {', '.join(_KEYS)})")
        lists = {}
        for k in _KEYS:
            v = g.get(k, [1.0] if k == "ld_scale" else None)
            if v is None:
                raise GridError(f"{where}: grid.{k}: missing")
            lists[k] = v if isinstance(v, list) else [v]
        for d in lists["dose"]:
            for iv in lists["interval"]:
                for n in lists["n_infusions"]:
                    for ld in lists["ld_scale"]:
                        item = dict(dose=d, interval=iv, n_infusions=n, ld_scale=ld)
                        out.append(_regimen_from(where, "grid", item))
    if not out:
        raise GridError(f"{where}: regimens: no regimen given")
    return list(dict.fromkeys(out))


def load_grid(text_or_path: str | Path) -> list[Regimen]:
    """Regimens from a YAML file, or from text ``DOSE:INTERVAL:N[:LD],...`` (10⁹ cells, days)."""
    p = Path(text_or_path)
    if p.suffix.lower() in (".yaml", ".yml") or p.exists():
        import yaml

        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GridError(f"{p}: file not found") from None
        except yaml.YAMLError as e:
            raise GridError(f"{p}: not valid YAML ({e})") from None
        return parse_grid(data, str(p))
    out = []
    for i, part in enumerate(str(text_or_path).split(",")):
        fields = part.strip().split(":")
        if len(fields) not in (3, 4):
            raise GridError(f"--grid: item {i + 1} {part!r}: expected DOSE:INTERVAL:N[:LD]")
        try:
            vals = [float(f) for f in fields]
        except ValueError:
            raise GridError(f"--grid: item {i + 1} {part!r}: not numbers") from None
        item = dict(zip(_KEYS, vals, strict=False))
        if item["n_infusions"].is_integer():
            item["n_infusions"] = int(item["n_infusions"])
        out.append(_regimen_from("--grid", f"item {i + 1}", item))
    return list(dict.fromkeys(out))


# --- utility ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utility:
    """U = w_remission·P(DORIS at 12 mo) − w_safety·P(Cmax > cmax_threshold) − w_cells·total cells (10⁹).

    ``cmax_threshold`` in CAR-NK cells/µL (ASSUMED safety proxy); weights are per unit probability and
    per 10⁹ cells.
    """

    w_remission: float = 1.0
    w_safety: float = 0.1
    w_cells: float = 0.01
    cmax_threshold: float = 100.0
    remission: str = "p_doris_12m"

    def describe(self) -> str:
        """The utility as a formula."""
        return (
            f"U = {self.w_remission:g}·P(DORIS at 12 mo) − {self.w_safety:g}·P(Cmax > "
            f"{self.cmax_threshold:g} cells/µL) − {self.w_cells:g}·total cells (10⁹)"
        ).replace("P(DORIS at 12 mo)", _LABELS.get(self.remission, self.remission))

    def __call__(self, ds: xr.Dataset) -> xr.DataArray:
        return (
            self.w_remission * ds[self.remission]
            - self.w_safety * ds["p_cmax_high"]
            - self.w_cells * ds["total_cells"]
        )


_LABELS = {
    "p_doris_6m": "P(DORIS at 6 mo)",
    "p_doris_12m": "P(DORIS at 12 mo)",
    "p_lldas_6m": "P(LLDAS at 6 mo)",
    "p_lldas_12m": "P(LLDAS at 12 mo)",
    "pta_da": "P(DA ≥ target)",
    "pta_depleted_d14": "P(B < 1/µL by day 14)",
    "p_cmax_high": "P(Cmax > threshold)",
    "cmax_median": "median CAR-NK Cmax (cells/µL)",
    "recon_day_median": "median B reconstitution day (not back by day 365: 365; never depleted: 0)",
    "b_nadir_median": "median B nadir (cells/µL)",
    "da_median": "median aplasia duration (days)",
}
SUMMARY_VARS = tuple(_LABELS)


# --- one task -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    n_patients: int
    n_transit: int
    structure: str
    n_nodes: int
    n_dose: int
    car_times: np.ndarray
    da_target: float
    cmax_threshold: float
    events: dict[str, Any]
    metric: str
    sweeps: int


def _events(spec: Any) -> dict[str, Any]:
    """Thresholds (cells/µL) and the aplasia window (days) of the model file's ``[events]``."""
    ev = dict(getattr(spec, "events", {}) or {})
    return dict(
        aplasia_threshold=float(ev.get("aplasia_threshold", 1.0)),
        reappearance_threshold=float(ev.get("reappearance_threshold", 1.0)),
        reconstitution_threshold=float(ev.get("reconstitution_threshold", 10.0)),
        aplasia_window=tuple(float(x) for x in ev.get("aplasia_window", [0.0, 180.0])),
    )


def _regimen_ld(spec: Any, reg: Regimen, n: int) -> dict[str, np.ndarray]:
    """The solver's LD inputs for ``n`` new patients on ``reg`` (the population layer's design)."""
    from carnk_pkpd.population import SubjectDesign

    return SubjectDesign.from_regimen(spec, reg, n).ld(spec)


def _regimen_nodes(reg: Regimen, st: _Settings, spec: Any) -> np.ndarray:
    """Node times (days) for one regimen, padded with repeats of the last node to ``n_nodes``.

    One grid serves every patient of the regimen: the one rate-bound rule
    (:func:`carnk_pkpd.population.solver_rate_bounds`, transit and kill caps) at default accuracy,
    with nodes at the regimen's LD window, infusions, visits and the aplasia window.
    """
    from carnk_pkpd.population import solver_rate_bounds
    from carnk_pkpd.structural.solve import make_grid

    k_tr_max, k_kill_max = solver_rate_bounds(spec)
    req = np.array([0.0, 14.0, *VISITS.values(), *st.events["aplasia_window"], HORIZON])
    g = make_grid(
        [reg.doses()],
        [np.unique(req)],
        ACCURACY,
        k_tr=k_tr_max,
        k_kill=k_kill_max,
        ld=_regimen_ld(spec, reg, 1),
        bucket=1,
    )
    nodes = np.unique(g.nodes[0])
    if st.n_nodes <= 0:
        return nodes
    if nodes.size > st.n_nodes:
        raise RuntimeError(f"internal: {nodes.size} nodes > padded size {st.n_nodes}")
    return np.concatenate([nodes, np.full(st.n_nodes - nodes.size, nodes[-1])])


def _simulate(
    theta: dict[str, np.ndarray],
    reg: Regimen,
    nodes: np.ndarray,
    st: _Settings,
    ld: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """B cells at the nodes ≥ 0, CAR-NK at ``st.car_times`` and every per-patient metric.

    ``theta`` holds ``(S,)`` arrays of individual parameters, ``ld`` the solver's ``(S,)`` LD inputs
    (window and intensity: ``ld_scale`` 0 means no LD kill).
    Returns ``(t_b, b, car, metrics)``: days, cells/µL ``(S, n)``, cells/µL ``(S, n_car)`` and the
    metrics of :func:`carnk_pkpd.structural.metrics.metrics_from_paths` (NaN = never happens).
    """
    from carnk_pkpd.structural.carnk import car_closed_form
    from carnk_pkpd.structural.metrics import metrics_from_paths
    from carnk_pkpd.structural.solve import solve_nodes_batched

    S = next(iter(theta.values())).shape[0]
    d = np.zeros((S, st.n_dose))
    a = np.zeros((S, st.n_dose))
    doses = np.asarray(reg.doses())
    d[:, : len(doses)], a[:, : len(doses)] = doses[:, 0], doses[:, 1]
    b_all = solve_nodes_batched(
        theta,
        np.broadcast_to(nodes, (S, nodes.size)),
        d,
        a,
        n_transit=st.n_transit,
        sweeps=st.sweeps,
        structure=st.structure,
        ld=ld,
    )
    sel = nodes >= 0.0
    t_b, b = nodes[sel], b_all[:, sel]
    # CAR-NK on the plot grid plus an instant before each infusion inside the metrics' window, so that
    # the AUC's trapezoid steps up at the infusion instead of ramping over a grid interval
    pre = doses[(doses[:, 0] > CAR_WINDOW[0]) & (doses[:, 0] <= CAR_WINDOW[1]), 0] - 1e-9
    t_all = np.concatenate([st.car_times, pre])
    car_all = np.asarray(
        car_closed_form(theta, d, a, np.broadcast_to(t_all, (S, t_all.size)), structure=st.structure, ld=ld)
    )
    car = car_all[:, : st.car_times.size]
    in_win = (t_all >= CAR_WINDOW[0] - 1e-9) & (t_all <= CAR_WINDOW[1] + 1e-9)
    order = np.argsort(t_all[in_win], kind="stable")
    ev = st.events
    m = metrics_from_paths(
        t_b,
        b,
        t_all[in_win][order],
        car_all[:, in_win][:, order],
        reappearance_threshold=ev["reappearance_threshold"],
        reconstitution_threshold=ev["reconstitution_threshold"],
        aplasia_threshold=ev["aplasia_threshold"],
        aplasia_window=ev["aplasia_window"],
    )
    return t_b, b, car, {k: v for k, (v, _) in m.items()}


def _car_times(regimens: Sequence[Regimen]) -> np.ndarray:
    last = max(r.interval * (r.n_infusions - 1) for r in regimens)
    return np.arange(0.0, max(last + 28.0, CAR_WINDOW[1]) + 1e-9, CAR_STEP)


def _settings(
    spec: Any,
    regimens: Sequence[Regimen],
    *,
    n_patients: int = 1,
    da_target: float = 45.0,
    cmax_threshold: float = 100.0,
    metric: str = "DA",
) -> tuple[_Settings, list[np.ndarray]]:
    """Settings shared by every task, and each regimen's padded node grid (one shape: one compile)."""
    from carnk_pkpd.structural.solve import ACCURACY as SOLVER_ACCURACY

    args = dict(
        n_patients=n_patients,
        n_transit=int(round(spec.parameters["n_transit"].typical)),
        structure=spec.structure,
        n_dose=max(r.n_infusions for r in regimens),
        car_times=_car_times(regimens),
        da_target=da_target,
        cmax_threshold=cmax_threshold,
        events=_events(spec),
        metric=metric,
        sweeps=int(SOLVER_ACCURACY[ACCURACY]["sweeps"]),
    )
    st0 = _Settings(n_nodes=0, **args)
    n_nodes = max(_regimen_nodes(r, st0, spec).size for r in regimens)
    st = _Settings(n_nodes=n_nodes, **args)
    return st, [_regimen_nodes(r, st, spec) for r in regimens]


def patient_metrics(params: Mapping[str, Any], regimen: Regimen, spec: Any) -> dict[str, np.ndarray]:
    """The dose search's per-patient metrics for given individual parameters (natural units).

    ``params`` maps structural parameter names to ``(S,)`` arrays (the file's typical value where
    missing); the regimen gives the infusions and the LD window and intensity. Returns the metrics of
    :func:`carnk_pkpd.structural.metrics.metrics_from_paths` (days, cells/µL, cells/µL·day; NaN when
    the event never happens), computed exactly as inside :func:`rank_regimens`.
    """
    from carnk_pkpd.structural import resolve_parameters

    theta, _, n = resolve_parameters(params, spec)
    theta = {k: np.array(v, float) for k, v in theta.items()}
    st, nodes = _settings(spec, [regimen])
    return _simulate(theta, regimen, nodes[0], st, _regimen_ld(spec, regimen, n or 1))[3]


def _run_task(
    reg: Regimen,
    pop: Any,
    link: xr.Dataset,
    seed_seq: np.random.SeedSequence,
    n_real: int,
    nodes: np.ndarray,
    st: _Settings,
) -> dict[str, np.ndarray]:
    """Simulate one (regimen, draw-chunk): per-draw population quantities over ``n_patients`` patients.

    ``pop`` (:class:`~carnk_pkpd.population.PopulationDraws`) and ``link`` hold the chunk's draws
    (padded; the first ``n_real`` are real). The patients come from
    :func:`~carnk_pkpd.population.individual_parameters` with a generator made from ``seed_seq``, so
    every regimen sees the same patients. Returns arrays of shape ``(n_real,)`` and median trajectories
    ``(n_real, n_time)``.
    """
    from carnk_pkpd.population import SubjectDesign, individual_parameters
    from carnk_pkpd.remission import link_arrays, link_values, marginal_probabilities

    rng = np.random.default_rng(seed_seq)
    cd, n_p = pop.n_draws, st.n_patients
    design = SubjectDesign.from_regimen(pop.spec, reg, n_p)
    theta = {k: v.reshape(-1) for k, v in individual_parameters(pop, design, rng).items()}
    ld = {k: np.tile(v, cd) for k, v in design.ld(pop.spec).items()}
    t_b, b, car, m = _simulate(theta, reg, nodes, st, ld)
    x = link_values(m, st.metric, st.events, HORIZON).reshape(cd, n_p)
    out = {}
    arrays = link_arrays(link)  # out of the Dataset once, for both visits
    for v, day in VISITS.items():
        pr = marginal_probabilities(arrays, x, day)  # patient effect integrated out (no u noise)
        out[f"p_doris_{v}"] = pr["DORIS"].mean(axis=1)[:n_real]
        out[f"p_lldas_{v}"] = pr["LLDAS"].mean(axis=1)[:n_real]

    def pop(x: np.ndarray) -> np.ndarray:
        return x.reshape(cd, n_p)[:n_real]

    da, cmax, nadir = m["DA"], m["car_cmax"], m["b_nadir"]
    # reconstitution day for the summary: the link's mapping (never depleted 0, not back HORIZON)
    recon = link_values(m, "reconstitution_day", st.events, HORIZON)
    depleted14 = b[:, t_b <= 14.0 + 1e-9].min(axis=1) < st.events["aplasia_threshold"]
    out.update(
        pta_da=(pop(da) >= st.da_target).mean(axis=1),
        pta_depleted_d14=pop(depleted14).mean(axis=1),
        p_cmax_high=(pop(cmax) > st.cmax_threshold).mean(axis=1),
        cmax_median=np.median(pop(cmax), axis=1),
        recon_day_median=np.median(pop(recon), axis=1),
        b_nadir_median=np.median(pop(nadir), axis=1),
        da_median=np.median(pop(da), axis=1),
    )
    # median trajectories over patients (B interpolated linearly between nodes)
    tu, iu = np.unique(t_b, return_index=True)
    j = np.clip(np.searchsorted(tu, B_PLOT_TIMES), 1, tu.size - 1)
    w = np.clip((B_PLOT_TIMES - tu[j - 1]) / (tu[j] - tu[j - 1]), 0.0, 1.0)
    bu = b[:, iu]
    b_plot = bu[:, j - 1] * (1 - w) + bu[:, j] * w
    out["b_traj"] = np.median(b_plot.reshape(cd, n_p, -1), axis=1)[:n_real]
    out["car_traj"] = np.median(car.reshape(cd, n_p, -1), axis=1)[:n_real]
    return out


# --- the search ---------------------------------------------------------------------------------------
def rank_regimens(
    fit: Any,
    regimens: Sequence[Regimen] | None = None,
    *,
    n_draws: int,
    n_patients: int,
    seed: int,
    utility: Utility | None = None,
    client: Any = None,
    da_target: float = 45.0,
    remission: xr.Dataset | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> xr.Dataset:
    """Simulate every regimen and rank them.

    Parameters
    ----------
    fit
        A :class:`~carnk_pkpd.fits.Fit` or :class:`~carnk_pkpd.population.PopulationDraws` (e.g.
        ``PopulationDraws.from_model(spec, n, seed, "prior")``, SYNTHETIC).
    regimens
        Candidate regimens; :func:`default_grid` when None.
    n_draws, n_patients
        Posterior draws (without replacement when fewer than available) and new patients per draw.
    seed
        Seeds the draw selection and the link draws paired with them (as ``predict`` does) and every
        task's patients (``SeedSequence([seed, 1]).spawn``: per chunk, the same for every regimen).
    utility
        Ranking utility; :class:`Utility` () by default.
    client
        A ``dask.distributed.Client``; None runs the tasks in this process (same results).
    da_target
        Target aplasia duration (days) for ``pta_da``.
    remission
        The remission link (:func:`carnk_pkpd.remission.remission_source`: a stage-2 posterior or the
        ASSUMED :func:`~carnk_pkpd.remission.assumed_link`). None: the fitted link of ``fit`` with
        ``seed``, exactly what ``predict`` uses (``PopulationDraws`` have none: pass one).
    progress
        Called as ``progress(done, total)`` after each task.

    Returns
    -------
    xarray.Dataset on ``regimen, draw`` (probabilities in [0, 1], days, cells/µL), with ``utility``,
    ``p_best`` (regimen), median trajectories ``b_traj`` (regimen, draw, time_b) and ``car_traj``
    (regimen, draw, time_car), and attrs describing the utility and the remission source.

    Raises
    ------
    ValueError
        No regimens, ``n_draws``/``n_patients`` < 1, a link metric the search does not compute, or no
        remission link for ``PopulationDraws``.
    """
    from carnk_pkpd.population import PopulationDraws, population_from
    from carnk_pkpd.remission import concordance_line, diagnostics_line, remission_source, select_draws
    from carnk_pkpd.structural.metrics import UNITS

    utility = utility or Utility()
    if n_draws < 1 or n_patients < 1:
        raise ValueError("n_draws and n_patients must be >= 1")
    # the draws and their link draws are chosen from ``seed`` exactly as predict chooses them
    # (population_from, then remission.select_draws with default_rng(seed), each link draw from the
    # imputation fitted on the same kinetic draw when there is one), so for the same fit, seed and
    # number of draws the two commands differ only in their virtual patients
    post = population_from(fit, n_draws, seed)
    spec = post.spec
    regimens = [Regimen.coerce(r) for r in regimens] if regimens is not None else default_grid(spec)
    if not regimens:
        raise ValueError("no regimens to rank")
    if remission is None:
        if isinstance(fit, PopulationDraws):
            raise ValueError(
                "PopulationDraws have no fitted remission link: pass remission= "
                "(e.g. carnk_pkpd.remission.assumed_link(spec), labelled ASSUMED)"
            )
        remission = remission_source(fit, seed=seed)
    metric = str(remission.attrs["metric"])
    if metric not in UNITS:
        raise ValueError(
            f"remission link metric {metric!r} is not a metric the search computes: {list(UNITS)}"
        )
    take = np.arange(post.n_draws)
    n_sel = take.size
    per_task = max(1, MAX_SUBJECTS_PER_TASK // n_patients)
    per_task = min(per_task, n_sel)
    n_chunks = math.ceil(n_sel / per_task)
    chunk_seqs = np.random.SeedSequence([seed, 1]).spawn(n_chunks)
    link_all = select_draws(remission, n_sel, np.random.default_rng(seed), stage1=post.draw)
    st, nodes_by_reg = _settings(
        spec,
        regimens,
        n_patients=n_patients,
        da_target=da_target,
        cmax_threshold=utility.cmax_threshold,
        metric=metric,
    )

    def chunk_inputs(c: int):
        idx = take[c * per_task : (c + 1) * per_task]
        n_real = idx.size
        pad = np.concatenate([idx, np.full(per_task - n_real, idx[-1])])
        pop = post.take(pad)
        sel = np.concatenate(
            [
                np.arange(c * per_task, c * per_task + n_real),
                np.full(per_task - n_real, c * per_task + n_real - 1),
            ]
        )
        link = link_all.isel(draw=sel).assign_coords(draw=np.arange(sel.size))
        return pop, link, n_real

    inputs = [chunk_inputs(c) for c in range(n_chunks)]
    tasks = [(r, c) for r in range(len(regimens)) for c in range(n_chunks)]
    results: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    total = len(tasks)
    if client is None:
        for k, (r, c) in enumerate(tasks):
            pop, link, n_real = inputs[c]
            results[(r, c)] = _run_task(regimens[r], pop, link, chunk_seqs[c], n_real, nodes_by_reg[r], st)
            if progress:
                progress(k + 1, total)
    else:
        from dask.distributed import as_completed

        futs = {}
        for r, c in tasks:
            pop, link, n_real = inputs[c]
            f = client.submit(
                _run_task,
                regimens[r],
                pop,
                link,
                chunk_seqs[c],
                n_real,
                nodes_by_reg[r],
                st,
                pure=False,
                key=f"doses-{r}-{c}-{seed}",
            )
            futs[f] = (r, c)
        for k, f in enumerate(as_completed(list(futs))):
            results[futs[f]] = f.result()
            f.release()
            if progress:
                progress(k + 1, total)

    names = list(results[(0, 0)])
    stacked = {
        n: np.stack(
            [np.concatenate([results[(r, c)][n] for c in range(n_chunks)]) for r in range(len(regimens))]
        )
        for n in names
    }
    coords = dict(
        regimen=np.arange(len(regimens)),
        draw=post.draw,
        label=("regimen", [_label(r) for r in regimens]),
        dose=("regimen", [r.dose for r in regimens], {"units": "1e9 cells per infusion"}),
        interval=("regimen", [r.interval for r in regimens], {"units": "days"}),
        n_infusions=("regimen", [r.n_infusions for r in regimens]),
        ld_scale=("regimen", [r.ld_scale for r in regimens]),
        time_b=("time_b", B_PLOT_TIMES, {"units": "days"}),
        time_car=("time_car", st.car_times, {"units": "days"}),
    )
    data = {}
    for n, v in stacked.items():
        if n == "b_traj":
            data[n] = (("regimen", "draw", "time_b"), v, {"units": "cells/µL", "long_name": "median B cells"})
        elif n == "car_traj":
            data[n] = (
                ("regimen", "draw", "time_car"),
                v,
                {"units": "cells/µL", "long_name": "median CAR-NK"},
            )
        else:
            data[n] = (("regimen", "draw"), v, {"long_name": _LABELS.get(n, n)})
    ds = xr.Dataset(data, coords=coords)
    ds["total_cells"] = ("regimen", [_total(r) for r in regimens], {"units": "1e9 cells"})
    ds["utility"] = utility(ds).transpose("regimen", "draw")
    best = ds["utility"].argmax("regimen")
    ds["p_best"] = (ds["regimen"] == best).mean("draw")
    ds.attrs.update(
        utility=utility.describe(),
        utility_weights=str(asdict(utility)),
        remission_source=str(remission.attrs.get("source", "fitted remission model")),
        remission_diagnostics=diagnostics_line(remission),
        remission_concordance=concordance_line(remission),
        remission_metric=metric,
        synthetic=int(bool(post.synthetic)),
        seed=seed,
        n_draws=n_sel,
        n_patients=n_patients,
        da_target=da_target,
        interval_note="q05/q95: 90% interval across posterior draws of the population quantity",
    )
    return ds


def run_search(
    fit: Any,
    regimens: Sequence[Regimen] | None = None,
    *,
    n_draws: int,
    n_patients: int,
    seed: int,
    utility: Utility | None = None,
    da_target: float = 45.0,
    assumed_link: bool = False,
    published: str | Path | None = None,
    scheduler: str | None = None,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> xr.Dataset:
    """The ``doses`` command: the remission link, a Dask cluster when asked, and :func:`rank_regimens`.

    The link is :func:`carnk_pkpd.remission.remission_source` (the fitted link, cached in the fit
    folder, as ``predict`` uses; the model file's ASSUMED link only with ``assumed_link=True``).
    ``scheduler`` (a Dask address) or ``workers`` > 0 (local worker processes, one CPU each:
    :func:`carnk_pkpd.xla.local_cluster`) run the tasks on Dask; the cluster is opened here and
    closed before returning. Results do not depend on the number of workers.
    """
    from carnk_pkpd.remission import remission_source

    remission = remission_source(fit, assumed=assumed_link, published=published, seed=seed)
    client = cluster = None
    try:
        if scheduler or workers > 0:
            from dask.distributed import Client

            if scheduler:
                client = Client(scheduler)
            else:
                cluster, client = xla.local_cluster(workers)  # worker processes, one CPU each
        return rank_regimens(
            fit,
            regimens,
            n_draws=n_draws,
            n_patients=n_patients,
            seed=seed,
            utility=utility,
            client=client,
            da_target=da_target,
            remission=remission,
            progress=progress,
        )
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def quantile_mcse(x: np.ndarray, q: float) -> float:
    """Monte Carlo standard error of the ``q`` quantile of independent draws ``x``: half the distance
    between the quantiles at ``q ± sqrt(q(1 − q)/n)`` (the binomial order-statistic interval of ±1 SE).
    The dose search's draws are posterior draws chosen at random from the fit, each with its own
    virtual patients, so they are treated as independent (ESS = number of draws)."""
    x = np.asarray(x, float)
    n = x.size
    if n < 2:
        return float("nan")
    d = np.sqrt(q * (1.0 - q) / n)
    lo, hi = np.quantile(x, [max(q - d, 0.0), min(q + d, 1.0)])
    return float((hi - lo) / 2.0)


def ranking_table(ds: xr.Dataset):
    """One row per regimen, best utility first: the regimen, each quantity's q05/median/q95 and the
    Monte Carlo standard error of its median (``*_median_mcse``), P(best) with its MCSE
    (``sqrt(P(1 − P)/draws)``), the utility (mean over draws, with q05/q95 and MCSE ``SD/sqrt(draws)``),
    its rank, and ``tied_with_top``: True when the draw-by-draw utility difference to the top regimen
    (the same virtual patients for every regimen) has a 90% interval that includes 0, i.e. the search
    cannot tell this regimen from the top one."""
    import pandas as pd

    rows = []
    n_draws = ds.sizes.get("draw", 1)
    for i in range(ds.sizes["regimen"]):
        r = ds.isel(regimen=i)
        row: dict[str, Any] = dict(
            regimen=str(r["label"].values),
            dose=float(r["dose"]),
            interval=float(r["interval"]),
            n_infusions=int(r["n_infusions"]),
            ld_scale=float(r["ld_scale"]),
            total_cells=float(r["total_cells"]),
        )
        for n in SUMMARY_VARS:
            if n in ds:
                v = r[n].values
                q = np.quantile(v, [0.05, 0.5, 0.95])
                row.update({f"{n}_q05": q[0], f"{n}_median": q[1], f"{n}_q95": q[2]})
                row[f"{n}_median_mcse"] = quantile_mcse(v, 0.5)
        pb = float(r["p_best"])
        row["p_best"] = pb
        row["p_best_mcse"] = float(np.sqrt(pb * (1.0 - pb) / n_draws))
        uv = r["utility"].values
        u = np.quantile(uv, [0.05, 0.5, 0.95])
        row.update(
            utility=float(np.mean(uv)),
            utility_mcse=float(np.std(uv, ddof=1) / np.sqrt(uv.size)) if uv.size > 1 else float("nan"),
            utility_q05=u[0],
            utility_median=u[1],
            utility_q95=u[2],
        )
        rows.append(row)
    df = pd.DataFrame(rows).sort_values(["utility", "p_best"], ascending=False, kind="stable")
    top = ds["utility"].isel(regimen=int(df.index[0])).values
    tied = []
    for i in df.index:
        diff = top - ds["utility"].isel(regimen=int(i)).values
        tied.append(bool(np.quantile(diff, 0.05) <= 0.0))
    df["tied_with_top"] = tied
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df.reset_index(drop=True)


def tie_statement(table: Any) -> str:
    """A plain sentence when the top regimens cannot be told apart (``tied_with_top``), else ''."""
    tied = table[table["tied_with_top"]]
    if len(tied) < 2:
        return ""
    names = ", ".join(tied["regimen"].astype(str).head(8)) + (", ..." if len(tied) > 8 else "")
    return (
        f"The top {len(tied)} regimens cannot be told apart ({names}): for each, the 90% interval of its "
        "utility difference to the top regimen (same virtual patients) includes 0. Rank them on other "
        "grounds, or run more draws and patients (--draws, --patients)."
    )


def describe(ds: xr.Dataset) -> str:
    """What the numbers are: SYNTHETIC flag, utility, remission source, draws and patients."""
    lines = [
        "SYNTHETIC fit: every number below comes from synthetic data" if ds.attrs.get("synthetic") else "",
        f"utility: {ds.attrs['utility']}",
        f"remission: {ds.attrs['remission_source']}",
        ds.attrs.get("remission_diagnostics", ""),
        ds.attrs.get("remission_concordance", ""),
        f"{ds.attrs['n_draws']} posterior draws x {ds.attrs['n_patients']} new patients per regimen, "
        f"seed {ds.attrs['seed']}; target DA >= {ds.attrs['da_target']:g} days",
        ds.attrs["interval_note"],
    ]
    return "\n".join(x for x in lines if x)


def write_results(ds: xr.Dataset, out: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``ranking.csv``, ``doses.nc`` and the plots to ``out`` atomically (temp folder, rename)."""
    from carnk_pkpd.atomic import atomic_folder
    from carnk_pkpd.plots_doses import plot_all
    from carnk_pkpd.provenance import lines_from_attrs, write_csv

    dest = Path(out)
    with atomic_folder(
        dest, overwrite=overwrite, kind="doses", command="doses", needs_overwrite=False
    ) as tmp:
        write_csv(ranking_table(ds), tmp / "ranking.csv", lines_from_attrs({"command": "doses", **ds.attrs}))
        (tmp / "about.txt").write_text(describe(ds) + "\n", encoding="utf-8")
        ds.to_netcdf(tmp / "doses.nc")
        plot_all(ds, tmp)
    return dest
