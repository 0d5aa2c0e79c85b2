"""An independent reference solution of the science.md §4 model, for tests and benchmarks.

Written from the equations of science.md §4 with plain NumPy and ``scipy.integrate.solve_ivp`` (Radau,
analytic Jacobian); it imports nothing from ``carnk_pkpd``. The state is ``[N, P1..Pn, B]``:

- N, CAR-NK cells/µL in blood: each infusion of D×10⁹ cells adds f_bl·D·10⁹/V_bl;
  ``reference``: dN/dt = [ρ·e^(−k_h t) − α − k_rej·(1 − e^(−k_rec (t+3)))]·N, integrated with the rest;
  ``stein`` (Stein et al. 2019 CPT:PSP, one cohort of cells per infusion): the cells of an infusion at
  t_j expand at ρ until t_j + T_exp, then split into effectors (1 − F_mem) lost at α and persisting cells
  (F_mem) lost at β; N is that closed form (:func:`car_closed_form`), *given* to the B lineage, and its
  state entry is unused;
- dP1/dt = k_B·B0·F(B) − (k_tr + k_LD)·P1,
  dPi/dt = k_tr·(P(i−1) − Pi) − [f_BM·K(N) + k_LD]·Pi (i = 2..n),
  dB/dt = k_tr·Pn − k_B·B − [K(N) + k_LD]·B,
  with K(N) = k_kmax·N/(N + EC50), F(B) = 1 + F_max·max(0, 1 − B/B0), k_tr = n/MTT,
  k_LD = k_LD0 on [−5, −3], k_LD0·e^(−k_LDd (t+3)) after, 0 before;
- steady state before day −5: N = 0, Pi = k_B·B0/k_tr, B = B0.

Integration is piecewise, restarting at t = −5, −3, each infusion and (``stein``) each end of
expansion t_j + T_exp, where dN/dt jumps; N is right-continuous (a sample at an infusion time includes
that infusion). The kink of F at B = B0 is located by an event and the integration restarts there, so
each piece has a smooth right-hand side.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.integrate import solve_ivp

__all__ = [
    "BSV_SD",
    "BSV_SD_STEIN",
    "KINK_BAND",
    "LD_WINDOW",
    "N_TRANSIT_LADDER",
    "SAMPLING_DAYS",
    "STRUCTURES",
    "TYPICAL",
    "TYPICAL_STEIN",
    "car_closed_form",
    "draw_parameter_sets",
    "jacobian",
    "reference_solution",
    "reference_solutions",
    "solve_case",
    "worker_pool",
    "rhs",
    "sample_times",
]

STRUCTURES: tuple[str, ...] = ("reference", "stein")

#: B-lineage parameters, shared by both structures (science.md §4 table).
_B_LINEAGE: dict[str, float] = {
    "B0": 100.0,
    "k_B": 0.025,
    "MTT": 55.0,
    "n_transit": 6,
    "F_max": 1.5,
    "k_kmax": 3.0,
    "EC50": 0.5,
    "f_BM": 1.0,
    "k_LD0": 0.6,
    "k_LDd": 0.3,
    "V_bl": 5e6,
}

#: Typical values of science.md §4 (rates /d, counts cells/µL, MTT d, V_bl µL).
TYPICAL: dict[str, float] = {
    "f_bl": 0.02,
    "rho": 0.35,
    "k_h": 0.10,
    "alpha": 0.15,
    "k_rej": 0.15,
    "k_rec": 0.05,
    **_B_LINEAGE,
}

#: Typical values of the Stein structure (models/stein.toml; all assumed): expansion at ρ for T_exp days
#: after each infusion, then effectors lost at α and a fraction F_mem of persisting cells lost at β.
TYPICAL_STEIN: dict[str, float] = {
    "f_bl": 0.02,
    "rho": 0.4,
    "T_exp": 2.0,
    "alpha": 0.25,
    "beta": 0.1,
    "F_mem": 0.005,
    **_B_LINEAGE,
}

#: Log-scale BSV SDs of the science.md §4 table ("–" = 0).
BSV_SD: dict[str, float] = {
    "f_bl": 0.5,
    "rho": 0.3,
    "alpha": 0.3,
    "k_rej": 0.4,
    "B0": 0.7,
    "k_B": 0.3,
    "MTT": 0.25,
    "F_max": 0.5,
    "k_kmax": 0.5,
    "EC50": 0.7,
}

#: Log-scale BSV SDs of models/stein.toml (CAR-NK part assumed; B lineage as science.md §4).
BSV_SD_STEIN: dict[str, float] = {
    "f_bl": 0.5,
    "rho": 0.3,
    "T_exp": 0.3,
    "alpha": 0.4,
    "beta": 0.4,
    "F_mem": 0.5,
    **{k: BSV_SD[k] for k in ("B0", "k_B", "MTT", "F_max", "k_kmax", "EC50")},
}

#: Chain lengths drawn by :func:`draw_parameter_sets` (few distinct values: each is a separate compile
#: of the JAX solver under test, so the stress sets group into few batches).
N_TRANSIT_LADDER: tuple[int, ...] = (2, 3, 6, 12, 24)

#: Relative band around B0 within which the branch of F(B) = 1 + F_max·max(0, 1 − B/B0) is kept.
KINK_BAND: float = 1e-12

#: Lymphodepletion kill window (days): k_LD0 on [start, end], decaying after end.
LD_WINDOW: tuple[float, float] = (-5.0, -3.0)

#: Sampling days of science.md §4 (months as 30 d; month 12 = 365 d).
SAMPLING_DAYS: dict[str, tuple[float, ...]] = {
    "car": (1, 2, 4, 7, 10, 14, 21, 28, 35, 42, 56, 90),
    "bcell": (-2, 0, 3, 7, 14, 21, 28, 42, 56, 70, 84, 120, 150, 180, 270, 365),
    "clinical": (0, 28, 60, 90, 120, 150, 180, 270, 365),
}


def _make_system(p: dict[str, float], structure: str, below: bool, doses: Sequence[tuple[float, float]] = ()):
    """Right-hand side and Jacobian for one smooth piece, with the parameters bound as floats.

    ``below`` selects the branch of F(B): True uses 1 + F_max·(1 − B/B0) (valid for B ≤ B0), False uses 1.
    ``doses`` (days, 10⁹ cells) give N for ``stein``, where N is a known function of time.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r} (expected one of {STRUCTURES})")
    n = int(p["n_transit"])
    k_tr = n / float(p["MTT"])
    b0, k_b, f_max = float(p["B0"]), float(p["k_B"]), float(p["F_max"])
    k_kmax, ec50, f_bm = float(p["k_kmax"]), float(p["EC50"]), float(p["f_BM"])
    k_ld0, k_ldd = float(p["k_LD0"]), float(p["k_LDd"])
    given = structure == "stein"
    if not given:
        rho, k_h, alpha = float(p["rho"]), float(p["k_h"]), float(p["alpha"])
        k_rej, k_rec = float(p["k_rej"]), float(p["k_rec"])
    ld_start, ld_end = LD_WINDOW
    diag = np.arange(2, n + 1)

    def k_ld(t: float) -> float:
        if t < ld_start:
            return 0.0
        if t <= ld_end:
            return k_ld0
        return k_ld0 * float(np.exp(-k_ldd * (t - ld_end)))

    def growth(t: float) -> float:
        return rho * float(np.exp(-k_h * t)) - alpha - k_rej * (1.0 - float(np.exp(-k_rec * (t + 3.0))))

    if given:  # scalar form of _stein_car, evaluated at every call of the right-hand side
        rho_s, t_exp, alpha_s = float(p["rho"]), float(p["T_exp"]), float(p["alpha"])
        beta_s, f_mem = float(p["beta"]), float(p["F_mem"])
        cohorts = [
            (t_j, float(p["f_bl"]) * amt * 1e9 / float(p["V_bl"])) for t_j, amt in _merge_doses(doses).items()
        ]

    def car_at(t: float, y: np.ndarray) -> float:
        if not given:
            return y[0]
        total = 0.0
        for t_j, n0 in cohorts:
            u = t - t_j
            if u < 0.0:
                continue
            if u <= t_exp:
                total += n0 * math.exp(rho_s * u)
            else:
                s = u - t_exp
                total += (
                    n0
                    * math.exp(rho_s * t_exp)
                    * ((1.0 - f_mem) * math.exp(-alpha_s * s) + f_mem * math.exp(-beta_s * s))
                )
        return total

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        kld = k_ld(t)
        car, b = car_at(t, y), y[n + 1]
        kill = k_kmax * car / (car + ec50)
        boost = 1.0 + f_max * (1.0 - b / b0) if below else 1.0
        dy = np.empty_like(y)
        dy[0] = 0.0 if given else growth(t) * car
        dy[1] = k_b * b0 * boost - (k_tr + kld) * y[1]
        dy[2 : n + 1] = k_tr * (y[1:n] - y[2 : n + 1]) - (f_bm * kill + kld) * y[2 : n + 1]
        dy[n + 1] = k_tr * y[n] - k_b * b - (kill + kld) * b
        return dy

    def jac(t: float, y: np.ndarray) -> np.ndarray:
        kld = k_ld(t)
        car, b = car_at(t, y), y[n + 1]
        kill = k_kmax * car / (car + ec50)
        dkill = 0.0 if given else k_kmax * ec50 / (car + ec50) ** 2  # N is not a state for stein
        out = np.zeros((n + 2, n + 2))
        out[0, 0] = 0.0 if given else growth(t)
        out[1, 1] = -(k_tr + kld)
        if below:
            out[1, n + 1] = -k_b * f_max
        out[diag, diag - 1] = k_tr
        out[diag, diag] = -k_tr - f_bm * kill - kld
        out[diag, 0] = -f_bm * dkill * y[2 : n + 1]
        out[n + 1, n] = k_tr
        out[n + 1, n + 1] = -k_b - kill - kld
        out[n + 1, 0] = -dkill * b
        return out

    return fun, jac


def rhs(
    t: float,
    y: np.ndarray,
    p: dict[str, float],
    structure: str = "reference",
    below: bool = True,
    doses: Sequence[tuple[float, float]] = (),
) -> np.ndarray:
    """dy/dt for ``y = [N, P1..Pn, B]`` (cells/µL per day) at day ``t``.

    ``below`` selects the branch of F(B): True uses 1 + F_max·(1 − B/B0) (valid for B ≤ B0), False uses 1.
    For ``stein``, N comes from ``doses`` (its closed form) and ``dy[0]`` is 0.
    """
    return _make_system(p, structure, below, doses)[0](t, np.asarray(y, dtype=float))


def jacobian(
    t: float,
    y: np.ndarray,
    p: dict[str, float],
    structure: str = "reference",
    below: bool = True,
    doses: Sequence[tuple[float, float]] = (),
) -> np.ndarray:
    """Analytic Jacobian ∂(dy/dt)/∂y of :func:`rhs` (per day)."""
    return _make_system(p, structure, below, doses)[1](t, np.asarray(y, dtype=float))


def _merge_doses(doses: Sequence[tuple[float, float]]) -> dict[float, float]:
    merged: dict[float, float] = {}
    for time, amount in doses:
        merged[float(time)] = merged.get(float(time), 0.0) + float(amount)
    return merged


def _integrate_piece(
    a: float,
    b: float,
    y0: np.ndarray,
    inner: np.ndarray,
    p: dict[str, float],
    structure: str,
    rtol: float,
    atol: np.ndarray,
    doses: Sequence[tuple[float, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate from ``a`` to ``b`` (smooth except at B = B0, handled by events).

    Returns the state at ``b`` and the states at ``inner`` (sorted times in (a, b)).
    """
    b0 = p["B0"]
    y = np.array(y0, dtype=float)
    t = a
    todo = np.append(inner, b)
    out = np.empty((len(y), len(todo)))
    done = 0
    below = bool(y[-1] <= b0)
    for _ in range(10_000):
        if t >= b:
            break
        fun, jac = _make_system(p, structure, below, doses)
        # Switch branch only once B is KINK_BAND (relative) past B0, so round-off at an equilibrium
        # B = B0 cannot make the integration chatter; F differs from its exact value by < F_max·KINK_BAND.
        level = b0 * (1.0 + KINK_BAND) if below else b0 * (1.0 - KINK_BAND)

        def crossing(_t: float, state: np.ndarray, level: float = level) -> float:
            return state[-1] - level

        crossing.terminal = True  # type: ignore[attr-defined]
        crossing.direction = 1.0 if below else -1.0  # type: ignore[attr-defined]
        sol = solve_ivp(
            fun,
            (t, b),
            y,
            method="Radau",
            t_eval=todo[done:],
            events=crossing,
            jac=jac,
            rtol=rtol,
            atol=atol,
        )
        if sol.status < 0:
            raise RuntimeError(f"Radau failed on [{t}, {b}]: {sol.message}")
        values = np.asarray(sol.y, dtype=float).reshape(
            len(y), -1
        )  # empty list when no t_eval point was reached
        k = values.shape[1]
        out[:, done : done + k] = values
        done += k
        if sol.status == 1:
            t = float(sol.t_events[0][0])
            y = np.array(sol.y_events[0][0], dtype=float)
            below = not below
        else:
            t, y = b, out[:, -1].copy()
    else:  # pragma: no cover - cannot happen with the hysteresis band
        raise RuntimeError("too many restarts at B = B0")
    return y, out[:, :-1]


def reference_solution(
    params: dict[str, float],
    doses: Sequence[tuple[float, float]],
    times: np.ndarray,
    structure: str = "reference",
    rtol: float = 1e-10,
    atol: float = 1e-14,
    atol_car: float = 1e-20,
) -> tuple[np.ndarray, np.ndarray]:
    """CAR-NK and B cells (cells/µL) at ``times`` (days) by piecewise Radau integration.

    Parameters
    ----------
    params
        Parameter values in science.md §4 units (those of ``TYPICAL`` or ``TYPICAL_STEIN``).
    doses
        Infusions as ``(time in days, amount in 10⁹ cells)``.
    times
        Sample times in days (any order; returned in the same order).
    structure
        ``"reference"`` (N integrated with the B lineage) or ``"stein"`` (N in closed form, given).
    rtol, atol
        Tolerances of Radau; ``atol`` applies to P and B, ``atol_car`` to N, so that N keeps
        ``rtol`` relative accuracy far into its decline.

    Returns
    -------
    car, bcell : numpy.ndarray
        N and B (cells/µL) at ``times``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r} (expected one of {STRUCTURES})")
    times = np.asarray(times, dtype=float)
    n = int(params["n_transit"])
    k_tr = n / params["MTT"]
    steady = np.concatenate([[0.0], np.full(n, params["k_B"] * params["B0"] / k_tr), [params["B0"]]])
    states = np.tile(steady[:, None], (1, times.size))
    if times.size == 0:
        return states[0], states[-1]

    dose_at = _merge_doses(doses)
    t_end = float(times.max())
    start = min([LD_WINDOW[0], *dose_at])
    kinks = {t + float(params["T_exp"]) for t in dose_at} if structure == "stein" else set()
    breaks = sorted({start, *LD_WINDOW, *dose_at, *kinks, t_end})
    breaks = [x for x in breaks if start <= x <= t_end]
    atol_vec = np.full(n + 2, atol)
    atol_vec[0] = atol_car
    increment = params["f_bl"] * 1e9 / params["V_bl"]  # cells/µL per 10⁹ cells infused

    y = steady.copy()
    for i, a in enumerate(breaks):
        if a in dose_at and structure == "reference":
            y[0] += increment * dose_at[a]
        states[:, times == a] = y[:, None]
        if i + 1 == len(breaks):
            break
        b = breaks[i + 1]
        mask = (times > a) & (times < b)
        order = np.argsort(times[mask])
        inner = times[mask][order]
        no_car = y[0] == 0.0
        y, inner_states = _integrate_piece(a, b, y, inner, params, structure, rtol, atol_vec, doses)
        if no_car:  # dN/dt is proportional to N: N stays exactly 0 (Radau's LU leaves ~1e-25 otherwise)
            y[0] = 0.0
            inner_states[0] = 0.0
        idx = np.flatnonzero(mask)[order]
        states[:, idx] = inner_states
    if structure == "stein":
        states[0] = _stein_car(params, doses, times)
    return states[0], states[-1]


def car_closed_form(
    params: dict[str, float],
    doses: Sequence[tuple[float, float]],
    times: np.ndarray,
    structure: str = "reference",
) -> np.ndarray:
    """CAR-NK cells/µL by superposition over infusions; ``doses`` as ``(day, 10⁹ cells)``, ``times`` days.

    ``reference``: N(t) = Σ_{t_j ≤ t} (f_bl·D_j·10⁹/V_bl)·exp(G(t) − G(t_j)),
    G(t) = (ρ/k_h)(1 − e^(−k_h t)) − α t − k_rej·[t + e^(−k_rec (t+3))/k_rec].
    ``stein``: see :func:`_stein_car`.
    """
    if structure == "stein":
        return _stein_car(params, doses, times)
    if structure != "reference":
        raise ValueError(f"unknown structure {structure!r} (expected one of {STRUCTURES})")
    rho, k_h, alpha = params["rho"], params["k_h"], params["alpha"]
    k_rej, k_rec = params["k_rej"], params["k_rec"]

    def big_g(t: np.ndarray) -> np.ndarray:
        return (
            (rho / k_h) * (-np.expm1(-k_h * t)) - alpha * t - k_rej * (t + np.exp(-k_rec * (t + 3.0)) / k_rec)
        )

    times = np.asarray(times, dtype=float)
    car = np.zeros_like(times)
    g_t = big_g(times)
    for t_j, amount in _merge_doses(doses).items():
        on = times >= t_j
        car[on] += params["f_bl"] * amount * 1e9 / params["V_bl"] * np.exp(g_t[on] - big_g(np.array(t_j)))
    return car


def _stein_car(
    params: dict[str, float], doses: Sequence[tuple[float, float]], times: np.ndarray
) -> np.ndarray:
    """CAR-NK cells/µL of the Stein structure (Stein et al. 2019), one cohort per infusion.

    With n0 = f_bl·D_j·10⁹/V_bl and u = t − t_j ≥ 0: E = n0·e^(ρu) for u ≤ T_exp (M = 0); afterwards
    dE/du = −α·E and dM/du = F_mem·(α − β)·E − β·M, whose solution from E = Cmax = n0·e^(ρ·T_exp), M = 0 is
    E + M = Cmax·[(1 − F_mem)·e^(−α s) + F_mem·e^(−β s)], s = u − T_exp.
    """
    rho, t_exp, alpha = params["rho"], params["T_exp"], params["alpha"]
    beta, f_mem = params["beta"], params["F_mem"]
    times = np.asarray(times, dtype=float)
    car = np.zeros_like(times)
    for t_j, amount in _merge_doses(doses).items():
        n0 = params["f_bl"] * amount * 1e9 / params["V_bl"]
        u = times - t_j
        rising = (u >= 0.0) & (u <= t_exp)
        falling = u > t_exp
        car[rising] += n0 * np.exp(rho * u[rising])
        s = u[falling] - t_exp
        car[falling] += (
            n0 * np.exp(rho * t_exp) * ((1.0 - f_mem) * np.exp(-alpha * s) + f_mem * np.exp(-beta * s))
        )
    return car


def draw_parameter_sets(
    n: int = 100, seed: int | np.random.Generator = 0, structure: str = "reference"
) -> list[tuple[dict[str, float], list[tuple[float, float]]]]:
    """Stress-test parameter sets with their regimens: ``[(params, doses), ...]``.

    The first sets are corner cases (k_kmax 20/d with EC50 0.05/µL, F_max 5, MTT 20 or 120 d with
    n_transit 24 or 2, intervals 1 or 14 d, 1 or 6 infusions; for ``stein`` also the shortest and longest
    expansion and a large persisting fraction); the rest are log-normal around the typical values with
    twice the table's log-SD, half of them with extremes drawn uniformly (k_kmax 0.3–20 /d, EC50
    0.05–5 /µL, F_max 0–5, MTT 20–120 d, n_transit from ``N_TRANSIT_LADDER``, 2–24). Each regimen:
    interval τ 1–14 d, 1–6 infusions at 0, τ, 2τ, … of 0.75–3 ×10⁹ cells.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r} (expected one of {STRUCTURES})")
    rng = np.random.default_rng(seed)
    stein = structure == "stein"
    base = dict(TYPICAL_STEIN if stein else TYPICAL)
    bsv = BSV_SD_STEIN if stein else BSV_SD
    corners: list[tuple[dict[str, float], float, int, float]] = [
        ({}, 3.0, 3, 3.0),
        ({"k_kmax": 20.0, "EC50": 0.05, "F_max": 5.0, "MTT": 20.0, "n_transit": 24}, 1.0, 6, 3.0),
        ({"k_kmax": 20.0, "EC50": 0.05, "F_max": 5.0, "MTT": 120.0, "n_transit": 2}, 14.0, 1, 0.75),
        (
            {"F_max": 5.0, "MTT": 20.0, "n_transit": 2, **({"beta": 0.02} if stein else {"k_rej": 0.02})},
            7.0,
            3,
            1.0,
        ),
        ({"k_kmax": 0.3, "EC50": 5.0, "MTT": 120.0, "n_transit": 24}, 14.0, 6, 2.0),
    ]
    if stein:
        corners += [
            ({"T_exp": 0.25, "rho": 1.5, "F_mem": 0.5, "beta": 0.01}, 1.0, 6, 3.0),
            ({"T_exp": 10.0, "rho": 0.3, "alpha": 0.8, "k_kmax": 20.0, "EC50": 0.05}, 5.0, 2, 1.0),
        ]
    sets: list[tuple[dict[str, float], list[tuple[float, float]]]] = []
    for override, tau, n_inf, amount in corners[:n]:
        params = {**base, **override}
        sets.append((params, [(i * tau, amount) for i in range(n_inf)]))
    while len(sets) < n:
        params = dict(base)
        for name, sd in bsv.items():
            params[name] = base[name] * float(np.exp(2.0 * sd * rng.standard_normal()))
        if rng.random() < 0.5:
            params["k_kmax"] = float(np.exp(rng.uniform(np.log(0.3), np.log(20.0))))
            params["EC50"] = float(np.exp(rng.uniform(np.log(0.05), np.log(5.0))))
            params["F_max"] = float(rng.uniform(0.0, 5.0))
            params["MTT"] = float(rng.uniform(20.0, 120.0))
            params["n_transit"] = int(rng.choice(N_TRANSIT_LADDER))
        params["f_bl"] = min(params["f_bl"], 1.0)
        params["B0"] = float(np.clip(params["B0"], 5.0, 1000.0))
        params["k_kmax"] = min(params["k_kmax"], 20.0)
        params["EC50"] = max(params["EC50"], 0.05)
        params["F_max"] = min(params["F_max"], 5.0)
        params["MTT"] = float(np.clip(params["MTT"], 20.0, 120.0))
        if stein:
            params["rho"] = min(params["rho"], 1.5)
            params["T_exp"] = float(np.clip(params["T_exp"], 0.25, 10.0))
            params["F_mem"] = min(params["F_mem"], 0.5)
        tau = float(rng.uniform(1.0, 14.0))
        n_inf = int(rng.integers(1, 7))
        amount = float(rng.uniform(0.75, 3.0))
        sets.append((params, [(i * tau, amount) for i in range(n_inf)]))
    return sets


def sample_times(doses: Sequence[tuple[float, float]] = (), step: float = 0.5) -> np.ndarray:
    """Sorted days from −5 to 365: a grid of ``step`` days, the science.md §4 sampling days, the
    lymphodepletion days, each infusion time and a point 0.001 d before each infusion."""
    parts = [
        np.arange(-5.0, 365.0 + step / 2, step),
        np.array([-5.0, -4.0, -3.0]),
        *(np.asarray(days, dtype=float) for days in SAMPLING_DAYS.values()),
    ]
    for time, _ in doses:
        parts.append(np.array([time, time - 1e-3]))
    out = np.unique(np.concatenate(parts))
    return out[(out >= -5.0) & (out <= 365.0)]


def solve_case(
    params: dict[str, float],
    doses: Sequence[tuple[float, float]],
    structure: str = "reference",
    times: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(times, car, bcell)`` of :func:`reference_solution` at ``times`` or else ``sample_times(doses)``.

    A top-level function, so that worker processes can run it (see :func:`reference_solutions`).
    """
    times = sample_times(doses) if times is None else np.asarray(times, dtype=float)
    car, bcell = reference_solution(params, doses, times, structure=structure)
    return times, car, bcell


def worker_pool(processes: int | None = None) -> ProcessPoolExecutor:
    """Worker processes for reference solves, started with ``spawn``: the caller may have started JAX's
    threads, which ``fork`` would copy half-way. Workers import only this module."""
    return ProcessPoolExecutor(
        processes or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")
    )


def reference_solutions(
    cases: Sequence[tuple[dict[str, float], Sequence[tuple[float, float]]]],
    structure: str = "reference",
    times: Sequence[float] | None = None,
    processes: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`solve_case` for many ``(params, doses)`` cases, in worker processes."""
    if len(cases) <= 1 or processes == 1:
        return [solve_case(p, d, structure, times) for p, d in cases]
    with worker_pool(processes) as pool:
        futures = [pool.submit(solve_case, dict(p), list(d), structure, times) for p, d in cases]
        return [f.result() for f in futures]
