"""Exponentially fitted Gauss collocation for the B-lineage ODE, in JAX (float64).

What is solved
--------------
CAR-NK cells in blood, ``N(t)`` (cells/µL), have a closed form (``carnk.car_closed_form``). Given
``N``, the B lineage (science.md §4) is a chain whose every equation is linear in its own state::

    dP1/dt = k_B·B0·F(B) − (k_tr + k_LD)·P1
    dPi/dt = k_tr·P(i−1) − (k_tr + f_BM·K + k_LD)·Pi          i = 2..n
    dB/dt  = k_tr·Pn − (k_B + K + k_LD)·B
    K = k_kmax·N/(N + EC50),  F(B) = 1 + F_max·max(0, 1 − B/B0),  k_tr = n/MTT

How
---
On each step ``[t0, t0 + h]`` every state is written in its own integrating-factor frame
``y_i = x_i·exp(E_i(s))`` with ``E_i(s) = ∫_{t0}^{s}`` (its decay rate), so the stiff killing
``exp(−∫K)`` is carried exactly. ``∫K`` is integrated with 3-point Gauss–Legendre collocation of
``K(N(t))`` (N exact at the nodes). In the y-frame the chain reads ``y_i' = c_i·y_(i−1)·exp(ΔE_i)``;
P3..Pn have ``ΔE = 0`` (they share one decay rate), and for P1, P2 and B the exponent's mean slope is
taken out analytically (exponentially fitted weights, exact for a constant rate) and the rest is
collocated at the Gauss nodes. Because the chain is lower triangular, each step is an explicit sweep
P1 → P2 → … → B; the one feedback, ``F(B)`` on P1, starts from an exponential-Euler predictor of B
at the nodes and is corrected by further sweeps.

Why this method (measured; see ``benchmarks/bench_solver.py``)
--------------------------------------------------------------
* explicit RK4 on a fixed 0.25-day grid goes unstable when ``k_kmax·h`` is large (science.md §4);
* implicit Radau needs ``K·h ≲ 1`` to be *accurate* (its stability function is a rational
  approximation of ``exp(−K·h)``), i.e. thousands of steps when ``k_kmax`` is 20/d;
* the integrating-factor frame gives ``exp(−∫K)`` exactly, so the step is set by how fast K *changes*,
  not by its size: a few hundred steps per trajectory meet the default tolerance;
* written in JAX, the solve is vectorised over subjects (``vmap``-free: arrays carry a leading
  subject axis), differentiated exactly by reverse mode (the gradient of the discrete solution), and
  compiled once per cohort; nutpie's JAX backend calls it without leaving XLA.

The grid is data, not a parameter: it is built once per cohort from the infusion and sample times
(``make_grid``), always has a node at each subject's first and last LD day, each infusion and each
requested time, so every output is a node value (no interpolation) and no step straddles a
discontinuity of ``N`` or ``k_LD``. The LD window is data too (per subject, in the grid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from carnk_pkpd.structural.carnk import LD_KEYS, car_closed_form, ld_cumulative, trial_ld  # noqa: E402

# --- Gauss–Legendre collocation tables (3 nodes, order 6) ------------------------------------------
GL_C = np.array([0.5 - np.sqrt(15.0) / 10.0, 0.5, 0.5 + np.sqrt(15.0) / 10.0])
GL_B = np.array([5.0 / 18.0, 4.0 / 9.0, 5.0 / 18.0])
_VAND = np.vander(GL_C, 3, increasing=True)  # [j, m] = c_j**m
LAGRANGE = np.linalg.inv(_VAND).T  # L_k(v) = sum_m LAGRANGE[k, m] v**m
_UPPER = np.append(GL_C, 1.0)  # integrate to each node and to the end of the step
_N_SERIES = 9  # |z| < 0.05: truncation below 0.05**9/9! ≈ 5e-18
_N_MOMENTS = 4  # M_0..M_3: M_0..M_2 give the weights, M_1..M_3 their derivative in z
# Taylor coefficients of M_m(c, z) = ∫_0^c e^{zv} v^m dv = Σ_p z^p c^(m+p+1) / (p! (m+p+1))
_SERIES = np.zeros((len(_UPPER), _N_MOMENTS, _N_SERIES))
for _ci, _c in enumerate(_UPPER):
    for _m in range(_N_MOMENTS):
        for _p in range(_N_SERIES):
            _SERIES[_ci, _m, _p] = _c ** (_m + _p + 1) / (math.factorial(_p) * (_m + _p + 1))
# plain Gauss collocation (rate 0): A[j, k] = ∫_0^{c_j} L_k, b[k] = ∫_0^1 L_k
_MOMENTS0 = np.array([[c ** (m + 1) / (m + 1) for m in range(3)] for c in _UPPER])  # [4, 3]
W_ZERO = _MOMENTS0 @ LAGRANGE.T  # [4 (upper), 3 (k)]
GL_A = W_ZERO[:3]
assert np.allclose(W_ZERO[3], GL_B)


def _contract(a: jnp.ndarray, b: np.ndarray) -> jnp.ndarray:
    """``a @ b`` for a constant ``[m, k]`` matrix ``b``, written out as a sum of ``m`` scaled rows."""
    b = np.asarray(b)
    return sum(a[..., m, None] * jnp.asarray(b[m]) for m in range(b.shape[0]))


def _moments(z: jnp.ndarray) -> jnp.ndarray:
    """``M[..., j, m] = ∫_0^{c_j} e^{z v} v^m dv`` for the 3 nodes and the step end, m = 0..3.

    A Taylor series for |z| < 0.05 and the recurrence ``M_m = (c^m e^{zc} − m·M_(m−1))/z`` otherwise
    (the unused branch is fed a safe value so that no 0/0 is ever formed).
    """
    small = jnp.abs(z) < 0.05
    zs = jnp.where(small, z, 0.0)[..., None, None]
    coef = jnp.asarray(_SERIES)  # [4, 4, P]
    series = jnp.zeros(z.shape + coef.shape[:2]) + coef[..., -1]
    for p in range(_N_SERIES - 2, -1, -1):  # Horner over the series index p
        series = series * zs + coef[..., p]
    zl = jnp.where(small, 1.0, z)[..., None]  # [..., 1]
    c = jnp.asarray(_UPPER)
    e = jnp.exp(zl * c)  # [..., 4]
    recur = [jnp.expm1(zl * c) / zl]
    for m in range(1, _N_MOMENTS):
        recur.append((c**m * e - m * recur[-1]) / zl)
    return jnp.where(small[..., None, None], series, jnp.stack(recur, axis=-1))


@jax.custom_jvp
def fitted_weights(z: jnp.ndarray) -> jnp.ndarray:
    """Weights ``W[..., j, k] = ∫_0^{c_j} e^{z v} L_k(v) dv`` (j = 3 nodes and the step end).

    Exact for ``e^{z v}`` times a quadratic. The derivative is the closed form
    ``∂W/∂z = ∫ v·e^{z v} L_k(v) dv`` (moments shifted by one), so reverse mode never traces the series.

    The 3x3 product with the Lagrange matrix is written out as a sum of three scaled rows, not ``@``:
    XLA's CPU dot is slow on thousands of tiny matrices. Measured on one core (2026-12-07,
    ``benchmarks/bench_solver.py --sections a``, two runs each): 6.7-7.2k -> 10.3-11.0k trajectories/s
    with outputs at the sampling days, 2.3-2.5k -> 3.6-3.8k with daily outputs; a broadcast product
    summed over an axis gained less and lost 30% with daily outputs. The derivative (below) keeps
    ``@``: there the sum made the fit's value and gradient slower (4.3 -> 5.1 ms, side by side in one
    process), with or without an optimisation barrier on the moments.
    """
    return _contract(_moments(jnp.asarray(z))[..., :3], LAGRANGE.T)


@fitted_weights.defjvp
def _fitted_weights_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    m = _moments(jnp.asarray(z))
    lagrange_t = jnp.asarray(LAGRANGE.T)
    return m[..., :3] @ lagrange_t, (m[..., 1:] @ lagrange_t) * jnp.asarray(dz)[..., None, None]


# --- grids --------------------------------------------------------------------------------------------
RATE_BOUND_SDS = 2.5  # log-scale SDs above the typical value that the solver grid must still resolve


def rate_bounds(spec, theta: Mapping[str, np.ndarray] | None = None, n_transit: int | None = None) -> tuple:
    """The fastest transit rate n/MTT and maximal kill rate k_kmax (1/day) the solver grid must resolve.

    One rule for fits, predictions, simulations and the dose search: the typical value moved
    ``RATE_BOUND_SDS`` (2.5) log-scale SDs up, the SD being the prior's (0 when fixed) plus the BSV's
    (``bsv.sd``, estimated or fixed). Without ``theta`` two floats that depend on the model file only
    (a fit's grid serves every draw; every subject of a regimen shares one grid). With per-subject
    values ``theta`` (``MTT``, ``k_kmax`` arrays) the bound is raised to a subject's own rate where
    that is faster, so an extreme subject is still resolved; each subject's grid then depends on its
    own parameters only (not on which subjects are solved together). ``n_transit``: the chain length
    the subjects are solved with, when it differs from the file's.
    """
    k_tr, k_kill = _spec_rate_bounds(spec)
    if theta is None:
        return k_tr, k_kill
    if n_transit is None:
        n_transit = int(round(spec.parameters["n_transit"].typical))
    return (
        np.maximum(k_tr, n_transit / np.asarray(theta["MTT"], float)),
        np.maximum(k_kill, np.asarray(theta["k_kmax"], float)),
    )


def _spec_rate_bounds(spec) -> tuple[float, float]:
    n_transit = int(round(spec.parameters["n_transit"].typical))

    def spread(name: str) -> float:
        par = spec.parameters[name]
        prior_sd = 0.0 if par.fixed else float((par.prior or {}).get("sigma", 0.0))
        return RATE_BOUND_SDS * (prior_sd + float(par.bsv_sd))

    k_tr = n_transit / spec.parameters["MTT"].typical * np.exp(spread("MTT"))
    k_kill = spec.parameters["k_kmax"].typical * np.exp(spread("k_kmax"))
    return float(k_tr), float(k_kill)


ACCURACY = {
    # h_dose: step in the first dose_days after each infusion (N jumps and expands there);
    # h_active: step from −5 to the last infusion + active_days (CAR-NK may still kill);
    # h_late: step afterwards, capped at k_tr_steps / k_tr when the transit rate is known
    # (a long chain with a short MTT moves fast); kill_steps: the active step is capped at
    # kill_steps / k_kmax when the largest kill rate is known (a strong kill that switches off as N
    # falls through EC50 bends the integrating factor within a step); sweeps: passes of the F(B)
    # feedback per step.
    # Measured on the 100 stress sets of tests/test_solver.py (twice the table's BSV plus extremes)
    # against scipy Radau at rtol 1e-10: with outputs at the trial's sampling days only (the
    # coarsest grid), "default" stays below 0.33 of its tolerance (1e-3·|B| + 1e-3 cells/µL);
    # h_late 4 would reach 1.0 and a 1-day active step without the kill cap 43. "tight" stays below
    # 1 of 1e-6·|B| + 1e-8 with outputs every half day.
    "default": dict(
        h_dose=0.5,
        dose_days=4.0,
        h_active=1.0,
        active_days=60.0,
        h_late=3.0,
        k_tr_steps=1.0,
        kill_steps=5.0,
        sweeps=2,
    ),
    "tight": dict(
        h_dose=0.02,
        dose_days=6.0,
        h_active=0.05,
        active_days=90.0,
        h_late=0.25,
        k_tr_steps=0.1,
        kill_steps=1.0,
        sweeps=4,
    ),
}
NODE_BUCKET = 64  # pad node counts to a multiple of this so that JAX compiles few shapes
UNROLL = int(__import__("os").environ.get("CARNK_UNROLL", "1"))


@dataclass(frozen=True)
class Grid:
    """Integration nodes for a batch of subjects (all arrays numpy, padded to common shapes).

    ``nodes[s]`` are the node times (days; trailing repeats are zero-length steps);
    ``out_index[s, k]`` is the node holding requested time ``times[s, k]``; ``mask`` marks real
    requested times; ``dose_times``/``dose_amounts`` hold infusions (days, 10⁹ cells; amount 0 pads);
    ``ld`` the per-subject lymphodepletion inputs (``carnk.LD_KEYS``, arrays of shape (subject,);
    None: the trial's window, days −5..−3 at full intensity).
    """

    nodes: np.ndarray
    out_index: np.ndarray
    times: np.ndarray
    mask: np.ndarray
    dose_times: np.ndarray
    dose_amounts: np.ndarray
    sweeps: int
    ld: dict[str, np.ndarray] | None = None

    @property
    def n_subjects(self) -> int:
        return self.nodes.shape[0]


def _subject_nodes(
    doses: np.ndarray,
    times: np.ndarray,
    cfg: Mapping[str, float],
    k_tr: float | None,
    k_kill: float | None = None,
    ld_start: float = -5.0,
    ld_end: float = -3.0,
) -> np.ndarray:
    LD_START, LD_END = ld_start, ld_end  # noqa: N806 - the subject's LD window (days)
    t_first = min(LD_START, float(times.min()) if times.size else LD_START)
    t_end = max(float(times.max()) if times.size else 0.0, 0.0)
    last_dose = float(doses[:, 0].max()) if len(doses) else 0.0
    active_end = min(t_end, last_dose + cfg["active_days"])
    pieces = [np.array([t_first, LD_START, LD_END, 0.0, t_end]), times, doses[:, 0] if len(doses) else []]
    # active phase: uniform h_active from −5 to active_end
    if active_end > LD_START:
        h_active = cfg["h_active"]
        if k_kill and "kill_steps" in cfg:
            h_active = min(h_active, cfg["kill_steps"] / k_kill)
        n = int(np.ceil((active_end - LD_START) / h_active))
        pieces.append(np.linspace(LD_START, active_end, n + 1))
    # finer just after each infusion, where N jumps and expands
    for td in doses[:, 0] if len(doses) else []:
        hi = min(td + cfg["dose_days"], t_end)
        if hi > td:
            n = int(np.ceil((hi - td) / cfg["h_dose"]))
            pieces.append(np.linspace(td, hi, n + 1))
    if t_end > active_end:
        h_late = cfg["h_late"] if not k_tr else min(cfg["h_late"], cfg["k_tr_steps"] / k_tr)
        n = int(np.ceil((t_end - active_end) / h_late))
        pieces.append(np.linspace(active_end, t_end, n + 1))
    nodes = np.unique(np.concatenate([np.atleast_1d(np.asarray(p, float)) for p in pieces]))
    nodes = nodes[(nodes >= t_first) & (nodes <= t_end)]
    # merge nodes closer than 1e-9 d (keeping exact requested and infusion times)
    keep = np.concatenate([[True], np.diff(nodes) > 1e-9])
    return nodes[keep]


def make_grid(
    doses: Sequence[Sequence[tuple[float, float]]],
    times: Sequence[Sequence[float]],
    accuracy: str | Mapping[str, float] = "default",
    k_tr: float | Sequence[float] | np.ndarray | None = None,
    bucket: int = NODE_BUCKET,
    k_kill: float | Sequence[float] | np.ndarray | None = None,
    ld: Mapping[str, np.ndarray] | None = None,
) -> Grid:
    """Build the node grid for a batch of subjects.

    Parameters
    ----------
    doses
        Per subject, a sequence of ``(time_day, amount_1e9_cells)`` infusions.
    times
        Per subject, the requested output times (days since the first infusion).
    accuracy
        ``"default"``, ``"tight"`` or a mapping with the keys of ``ACCURACY["default"]``.
    k_tr
        Largest transit rate n/MTT (1/day) to resolve, per subject or one for all; caps the late
        step. Give the fastest plausible value when the grid serves many parameter draws.
    k_kill
        Largest maximal kill rate k_kmax (1/day) to resolve, per subject or one for all; caps the
        active step at ``kill_steps / k_kill``.
    ld
        Per-subject lymphodepletion inputs (``carnk.ld_inputs``); None: the trial's window
        (days −5..−3, full intensity) for every subject.
    bucket
        Pad the node count to a multiple of this, so that repeated calls compile few shapes; a grid
        that is compiled once (a fit) uses 1.
    """
    cfg = dict(ACCURACY[accuracy]) if isinstance(accuracy, str) else dict(accuracy)
    if len(doses) != len(times):
        raise ValueError(f"doses has {len(doses)} subjects but times has {len(times)}")
    node_list, idx_list, t_list = [], [], []
    dose_arr = [np.asarray(d, float).reshape(-1, 2) for d in doses]
    k_trs = np.broadcast_to(np.asarray(np.nan if k_tr is None else k_tr, float), (len(dose_arr),))
    k_kills = np.broadcast_to(np.asarray(np.nan if k_kill is None else k_kill, float), (len(dose_arr),))
    n_sub = len(dose_arr)
    ld_arr = trial_ld(n_sub) if ld is None else {k: np.asarray(ld[k], float).reshape(-1) for k in LD_KEYS}
    for k, v in ld_arr.items():
        if v.size != n_sub:
            raise ValueError(f"ld[{k!r}] has {v.size} values for {n_sub} subjects")
    for s_i, (d, t, ktr, kk) in enumerate(zip(dose_arr, times, k_trs, k_kills, strict=True)):
        t = np.asarray(t, float).ravel()
        if not np.all(np.isfinite(t)):
            raise ValueError("requested times must be finite")
        nodes = _subject_nodes(
            d,
            t,
            cfg,
            None if np.isnan(ktr) else float(ktr),
            None if np.isnan(kk) else float(kk),
            float(ld_arr["start"][s_i]),
            float(ld_arr["end"][s_i]),
        )
        idx = np.searchsorted(nodes, t)
        idx = np.clip(idx, 0, len(nodes) - 1)
        # snap to the nearest node (requested times are nodes up to the 1e-9 merge)
        left = np.clip(idx - 1, 0, len(nodes) - 1)
        idx = np.where(np.abs(nodes[left] - t) < np.abs(nodes[idx] - t), left, idx)
        node_list.append(nodes)
        idx_list.append(idx)
        t_list.append(t)
    n_nodes = max(len(n) for n in node_list)
    n_nodes = int(np.ceil(n_nodes / bucket) * bucket)
    n_out = max(max((len(t) for t in t_list), default=0), 1)
    n_dose = max(max((len(d) for d in dose_arr), default=0), 1)
    S = len(node_list)
    nodes = np.empty((S, n_nodes))
    out_index = np.zeros((S, n_out), dtype=np.int64)
    out_times = np.zeros((S, n_out))
    mask = np.zeros((S, n_out), dtype=bool)
    dose_times = np.zeros((S, n_dose))
    dose_amounts = np.zeros((S, n_dose))
    for s in range(S):
        k = len(node_list[s])
        nodes[s, :k] = node_list[s]
        nodes[s, k:] = node_list[s][-1]
        m = len(t_list[s])
        out_index[s, :m] = idx_list[s]
        out_times[s, :m] = t_list[s]
        mask[s, :m] = True
        if m < n_out:
            out_index[s, m:] = idx_list[s][-1] if m else 0
        nd = len(dose_arr[s])
        dose_times[s, :nd] = dose_arr[s][:, 0]
        dose_amounts[s, :nd] = dose_arr[s][:, 1]
    return Grid(nodes, out_index, out_times, mask, dose_times, dose_amounts, int(cfg["sweeps"]), ld_arr)


# --- the step -----------------------------------------------------------------------------------------
def _step_coefficients(th, nodes, dose_times, dose_amounts, n_transit, structure, ld):
    """Everything on every step that does not depend on the state, in bulk over (subject, step).

    Shapes: ``h`` (S, M); node arrays (S, M, 3); weights (S, M, 4, 3); end factors (S, M).
    """
    t0, t1 = nodes[:, :-1], nodes[:, 1:]
    h = t1 - t0
    gl_c = jnp.asarray(GL_C)
    s = t0[..., None] + h[..., None] * gl_c  # [S, M, 3]
    S, M = h.shape
    N = car_closed_form(
        th, dose_times, dose_amounts, s.reshape(S, M * 3), structure=structure, ld=ld
    ).reshape(S, M, 3)
    K = th["k_kmax"][:, None, None] * N / (N + th["EC50"][:, None, None])
    psi_k = h[..., None] * (K @ jnp.asarray(GL_A).T)
    psi_k_end = h * (K @ jnp.asarray(GL_B))
    ld0 = ld_cumulative(th, t0, ld)
    psi_ld = ld_cumulative(th, s.reshape(S, M * 3), ld).reshape(S, M, 3) - ld0[..., None]
    psi_ld_end = ld_cumulative(th, t1, ld) - ld0
    k_tr = (n_transit / th["MTT"])[:, None]
    k_B, f_BM = th["k_B"][:, None], th["f_BM"][:, None]
    dt = h[..., None] * gl_c
    # exponents of each state's integrating factor, at the nodes and at the end of the step
    e1, e1_end = k_tr[..., None] * dt + psi_ld, k_tr * h + psi_ld_end
    ep, ep_end = e1 + f_BM[..., None] * psi_k, e1_end + f_BM * psi_k_end
    eb, eb_end = k_B[..., None] * dt + psi_k + psi_ld, k_B * h + psi_k_end + psi_ld_end
    e_up, e_up_end = (ep, ep_end) if n_transit >= 2 else (e1, e1_end)

    def fitted(e_nodes, e_end):
        # mean slope taken out exactly (fitted weights), the remainder collocated at the nodes
        return h[..., None, None] * fitted_weights(e_end), jnp.exp(e_nodes - e_end[..., None] * gl_c)

    w1, x1 = fitted(e1, e1_end)
    w2, x2 = fitted(ep - e1, ep_end - e1_end)
    wb, xb = fitted(eb - e_up, eb_end - e_up_end)
    return dict(
        hA=h[..., None, None] * jnp.asarray(W_ZERO),
        w1=w1,
        x1=x1,
        w2=w2,
        x2=x2,
        wb=wb,
        xb=xb,
        d1=jnp.exp(-e1_end),
        dp=jnp.exp(-ep_end),
        db=jnp.exp(-eb_end),
        db_nodes=jnp.exp(-eb),
        dt=dt,
    )


def _apply(w, y0, q):
    """``y(s_j) = y0 + Σ_k w[j, k]·q_k`` at the 3 nodes (j < 3) and the end of the step (j = 3)."""
    out = y0[:, None] + jnp.sum(w * q[:, None, :], axis=-1)
    return out[:, :3], out[:, 3]


@partial(jax.jit, static_argnames=("n_transit", "sweeps", "structure"))
def solve_nodes(
    theta: Mapping[str, jnp.ndarray],
    nodes,
    dose_times,
    dose_amounts,
    *,
    n_transit: int,
    sweeps: int = 2,
    structure: str = "reference",
    ld: Mapping[str, jnp.ndarray] | None = None,
):
    """B cells (cells/µL) at every node, shape ``(subject, n_nodes)``.

    ``theta`` maps parameter names to arrays of shape ``(subject,)`` (natural units, see
    ``models/reference.toml``). ``nodes`` are node times (days) of shape ``(subject, n_nodes)``;
    trailing repeats of the last node are zero-length steps (no-ops). ``ld`` holds the per-subject lymphodepletion
    inputs (``carnk.LD_KEYS``, shape ``(subject,)``); None: the trial's window for every subject.
    """
    th = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in theta.items()}
    nodes = jnp.asarray(nodes, dtype=jnp.float64)
    n_sub = nodes.shape[0]
    ld = trial_ld(n_sub) if ld is None else ld
    ld = {k: jnp.broadcast_to(jnp.asarray(ld[k], dtype=jnp.float64), (n_sub,)) for k in LD_KEYS}
    dose_times, dose_amounts = jnp.asarray(dose_times), jnp.asarray(dose_amounts)
    co = _step_coefficients(th, nodes, dose_times, dose_amounts, n_transit, structure, ld)
    k_tr = n_transit / th["MTT"]
    B0, F_max, src0 = th["B0"], th["F_max"], th["k_B"] * th["B0"]
    p_ss = src0 / k_tr
    P_init = tuple(p_ss for _ in range(n_transit))
    B_init = B0

    def step(carry, c):
        P, B = carry
        # exponential-Euler predictor of B at the nodes, then sweeps of the chain
        b_nodes = B[:, None] * c["db_nodes"] + (k_tr * P[-1])[:, None] * c["dt"]
        for _ in range(sweeps):
            F = 1.0 + F_max[:, None] * jnp.maximum(0.0, 1.0 - b_nodes / B0[:, None])
            y_n, y1_end = _apply(c["w1"], P[0], src0[:, None] * F * c["x1"])
            ends = [y1_end]
            for i in range(1, n_transit):
                if i == 1:
                    y_n, y_end = _apply(c["w2"], P[1], k_tr[:, None] * y_n * c["x2"])
                else:
                    y_n, y_end = _apply(c["hA"], P[i], k_tr[:, None] * y_n)
                ends.append(y_end)
            yb_n, yb_end = _apply(c["wb"], B, k_tr[:, None] * y_n * c["xb"])
            b_nodes = yb_n * c["db_nodes"]
        P_new = (ends[0] * c["d1"], *(y * c["dp"] for y in ends[1:]))
        B_new = yb_end * c["db"]
        return (P_new, B_new), B_new

    xs = {k: jnp.moveaxis(v, 1, 0) for k, v in co.items()}  # scan over steps
    # Each step is rematerialised in the gradient (jax.checkpoint): reverse mode then keeps only the
    # carry per step and recomputes the step's sweeps when it goes back through it, instead of
    # storing every intermediate of every step. Those stored intermediates outgrew the cache between
    # 40 and 60 subjects (365 d each: value and gradient 11 ms at 40, 36 ms at 60); recomputing costs
    # less than fetching them from memory. Measured one core (benchmarks/bench_solver.py, section e):
    # 60 subjects 32.0 -> 14.5 ms, 20 subjects 4.8 -> 3.6 ms (365 d), 2.6 -> 1.95 ms (trial follow-up);
    # the same value and a gradient equal to 1e-13 relative (rounding order only).
    _, b_path = jax.lax.scan(jax.checkpoint(step), (P_init, B_init), xs, unroll=UNROLL)
    return jnp.concatenate([B_init[None, :], b_path], axis=0).T  # [S, n_nodes]


SOLVE_BATCH = 64  # subjects per solver call outside a fit: a batch's step coefficients stay in cache


def solve_nodes_batched(
    theta: Mapping[str, np.ndarray],
    nodes: np.ndarray,
    dose_times: np.ndarray,
    dose_amounts: np.ndarray,
    *,
    batch: int = SOLVE_BATCH,
    **kwargs,
) -> np.ndarray:
    """:func:`solve_nodes` over many subjects, ``batch`` at a time; a numpy array ``(subject, n_nodes)``.

    For simulation (not differentiated). One call over thousands of subjects spills the per-step
    coefficients out of cache: measured 2x slower on the dose search (4,000 patients per call vs 64).
    The last batch is padded with copies of its last subject, so every call has one shape and the
    solver compiles once; each subject's values are those of an unbatched solve. ``kwargs``:
    ``n_transit``, ``sweeps``, ``structure``, ``ld`` as for :func:`solve_nodes`.
    """
    nodes = np.asarray(nodes, float)
    n_sub = nodes.shape[0]
    ld = kwargs.pop("ld", None)
    n_batch = -(-n_sub // batch)
    rows_all = np.minimum(np.arange(n_batch * batch), n_sub - 1)
    parts = []
    for k in range(n_batch):
        rows = rows_all[k * batch : (k + 1) * batch]
        part = solve_nodes(
            {p: np.asarray(v)[rows] if np.ndim(v) == 1 else v for p, v in theta.items()},
            nodes[rows],
            np.asarray(dose_times)[rows],
            np.asarray(dose_amounts)[rows],
            ld=None if ld is None else {p: np.asarray(v)[rows] for p, v in ld.items()},
            **kwargs,
        )
        parts.append(np.asarray(part))
    return np.concatenate(parts, axis=0)[:n_sub]


def length_buckets(nodes: np.ndarray, step_cost: float = 100.0, max_buckets: int = 6) -> list[np.ndarray]:
    """Subjects grouped by their number of integration steps, for :func:`solve` with ``compact=True``.

    A group is solved on its own node array, padded only to its longest member, so a subject with a
    short follow-up does not pay for the longest one. Groups are contiguous in the step-count order and
    chosen by dynamic programming to minimise ``Σ (subjects × longest) + step_cost × groups`` (``step_cost``
    in subject-steps: what one more group costs in fixed overhead, measured at about 100 steps' worth
    by ``benchmarks/bench_solver.py``). Returns subject indices per group, each sorted; deterministic.
    """
    nodes = np.asarray(nodes, float)
    n_steps = (np.diff(nodes, axis=1) > 0).sum(axis=1)
    order = np.argsort(n_steps, kind="stable")
    counts = n_steps[order]
    n = len(order)
    # best[k][j]: least cost of the first j subjects (in step order) in k groups
    inf = float("inf")
    best = np.full((max_buckets + 1, n + 1), inf)
    cut = np.zeros((max_buckets + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, max_buckets + 1):
        for j in range(k, n + 1):  # k groups need at least k subjects
            i = np.arange(k - 1, j)  # the k-th group holds subjects i..j-1, the longest is j-1
            c = best[k - 1, i] + (j - i) * max(counts[j - 1], 1) + step_cost
            m = int(np.argmin(c))  # first minimum: the same choice as a scan over i
            best[k, j], cut[k, j] = c[m], i[m]
    k = int(np.argmin(best[:, n]))
    groups, j = [], n
    while k > 0:
        i = cut[k, j]
        groups.append(np.sort(order[i:j]))
        j, k = i, k - 1
    return groups[::-1]


def _subgrid(grid: Grid, idx: np.ndarray) -> Grid:
    """The subjects ``idx`` of ``grid``, their node array trimmed to the longest of them."""
    nodes = grid.nodes[idx]
    n_real = int((np.diff(nodes, axis=1) > 0).sum(axis=1).max()) + 1
    last = np.max(grid.out_index[idx]) + 1
    keep = max(n_real, int(last), 2)
    ld = None if grid.ld is None else {k: np.asarray(v)[idx] for k, v in grid.ld.items()}
    return Grid(
        nodes[:, :keep],
        grid.out_index[idx],
        grid.times[idx],
        grid.mask[idx],
        grid.dose_times[idx],
        grid.dose_amounts[idx],
        grid.sweeps,
        ld,
    )


def solve(
    theta: Mapping[str, jnp.ndarray],
    grid: Grid,
    *,
    n_transit: int,
    structure: str = "reference",
    compact: bool = False,
    batched: bool = False,
):
    """CAR-NK and B cells (cells/µL) at the grid's requested times, each ``(subject, n_times)``.

    Pure and differentiable in ``theta`` (JAX arrays of shape ``(subject,)``). ``compact=True``
    solves the subjects in groups of similar length (:func:`length_buckets`), each padded only to its
    longest member, so that short follow-ups do not pay for long ones: worth it when one grid is
    solved many times (a fit); the grouping is fixed by the grid, so it compiles once.
    ``batched=True`` (simulation of many subjects, numpy values, not differentiated) solves
    :data:`SOLVE_BATCH` subjects per call (:func:`solve_nodes_batched`).
    """
    if compact and grid.n_subjects > 1:
        groups = length_buckets(grid.nodes)
        if len(groups) > 1:
            parts = []
            for idx in groups:
                th = {k: (v[idx] if jnp.ndim(v) == 1 else v) for k, v in theta.items()}
                parts.append(solve(th, _subgrid(grid, idx), n_transit=n_transit, structure=structure))
            back = np.argsort(np.concatenate(groups))
            car = jnp.concatenate([c for c, _ in parts], axis=0)[back]
            bcell = jnp.concatenate([b for _, b in parts], axis=0)[back]
            return car, bcell
        grid = _subgrid(grid, np.arange(grid.n_subjects))
    b_nodes = (solve_nodes_batched if batched else solve_nodes)(
        theta,
        grid.nodes,
        grid.dose_times,
        grid.dose_amounts,
        n_transit=n_transit,
        sweeps=grid.sweeps,
        structure=structure,
        ld=grid.ld,
    )
    bcell = jnp.take_along_axis(b_nodes, jnp.asarray(grid.out_index), axis=1)
    ld = grid.ld if grid.ld is not None else trial_ld(grid.n_subjects)
    car = car_closed_form(
        theta, grid.dose_times, grid.dose_amounts, jnp.asarray(grid.times), structure=structure, ld=ld
    )
    return car, bcell
