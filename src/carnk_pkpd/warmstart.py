"""Where the chains start and on what scale they move: the posterior mode and a Laplace whitening.

Why (measured on the SYNTHETIC reference cohort, one chain, ``benchmarks/bench_fit.py``): started at
the prior's centre, nutpie spends its early warm-up at the maximum tree depth (1,023 leapfrog steps
per draw for the first ~20 draws, step size 0.007–0.03), because the unconstrained posterior SDs span
0.02–1 and nutpie's first mass matrix is a guess from one gradient. Starting from the mode was not
enough on its own: at the mode the gradient is ~0 and that guess is useless.

What
----
1. The mode of the log posterior on the unconstrained scale (L-BFGS from the prior's centre: typical
   values at their prior medians, every η = 0). Deterministic: no random start.
2. The Hessian there, by central differences of the exact (JAX) gradient. The η's of different
   subjects never meet in one likelihood term, so their cross-derivatives are exactly 0: all
   subjects' η of one parameter are perturbed together and the columns are separated afterwards.
   The Hessian costs 2·(η parameters + population parameters) gradients, whatever the cohort size.
3. The whitening ``x = mode + L·u`` with ``L = V·Λ^(−1/2)`` from the eigen-decomposition of the Hessian
   (eigenvalues floored at ``EIGEN_FLOOR``). NUTS samples ``u``; the draws are mapped back before they
   are stored. An affine map with a constant Jacobian leaves the posterior exactly as it was; only
   the sampler's view of it changes.
4. Chains start at ``u`` with every coordinate ±1 (random signs from the chain's seed): a point of
   the Laplace approximation's typical set, where nutpie's first mass matrix (1/|gradient| per
   coordinate) is the identity, and where different chains start apart (R-hat stays meaningful).

The Laplace approximation is only the sampler's starting scale: nutpie's low-rank adaptation goes on
from it, and nothing here is reported as a posterior.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Smallest Hessian eigenvalue used (1/variance on the unconstrained scale): directions that the
#: data and priors leave flat, or a mode the optimiser left slightly short of, get an SD of at most
#: 1/sqrt(0.1) ≈ 3.2 — wider than any prior on this scale.
EIGEN_FLOOR = 0.1
#: Central-difference step on the unconstrained scale (the gradient is exact and smooth: the
#: solver's grid does not move with the parameters).
FD_STEP = 1e-5
MAX_ITER = 1000

LogpGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class Whitening:
    """``x = mode + L @ u`` (unconstrained scale); ``n_gradients`` and ``seconds`` it cost."""

    mode: np.ndarray
    L: np.ndarray
    logp_mode: float
    n_gradients: int
    seconds: float
    converged: bool

    def to_x(self, u: np.ndarray) -> np.ndarray:
        return self.mode + self.L @ u


def find_mode(
    logp_grad: LogpGrad, x0: np.ndarray, max_iter: int = MAX_ITER
) -> tuple[np.ndarray, float, int, bool]:
    """The maximum of ``logp`` by L-BFGS from ``x0``: ``(x, logp, gradients used, converged)``."""
    from scipy.optimize import minimize

    count = [0]

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        count[0] += 1
        value, grad = logp_grad(x)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return np.inf, np.zeros_like(x)
        return -value, -np.asarray(grad, float)

    res = minimize(
        objective, np.asarray(x0, float), jac=True, method="L-BFGS-B", options=dict(maxiter=max_iter)
    )
    return np.asarray(res.x, float), float(-res.fun), count[0], bool(res.success)


def structured_hessian(
    logp_grad: LogpGrad, x: np.ndarray, subject_blocks: Sequence[np.ndarray], step: float = FD_STEP
) -> tuple[np.ndarray, int]:
    """The Hessian of ``logp`` at ``x`` by central differences of its gradient: ``(H, gradients used)``.

    ``subject_blocks``: one integer array per η parameter, its flat indices in subject order (every
    block the same length). Indices in no block are population parameters. Cross-derivatives between
    η's of different subjects are 0 (each subject's likelihood involves its own η's only), so one
    perturbation of a whole block gives one Hessian column per subject."""
    d = x.size
    blocks = [np.asarray(b, int) for b in subject_blocks]
    in_block = np.zeros(d, bool)
    for b in blocks:
        in_block[b] = True
    if blocks and len({b.size for b in blocks}) != 1:
        raise ValueError("every η block must hold one index per subject")
    n_sub = blocks[0].size if blocks else 0
    subject_of = np.full(d, -1)
    for b in blocks:
        subject_of[b] = np.arange(n_sub)
    population = np.flatnonzero(~in_block)
    H = np.zeros((d, d))
    used = 0

    def column(direction: np.ndarray) -> np.ndarray:
        nonlocal used
        used += 2
        g_plus = logp_grad(x + step * direction)[1]
        g_minus = logp_grad(x - step * direction)[1]
        return -(np.asarray(g_plus) - np.asarray(g_minus)) / (2.0 * step)

    for j in population:
        e = np.zeros(d)
        e[j] = 1.0
        H[:, j] = column(e)
    eta_rows = np.flatnonzero(in_block)
    for b in blocks:
        e = np.zeros(d)
        e[b] = 1.0
        c = column(e)
        for s, j in enumerate(b):  # rows of subject s's η's belong to column j
            rows = eta_rows[subject_of[eta_rows] == s]
            H[rows, j] = c[rows]
    H[np.ix_(population, eta_rows)] = H[np.ix_(eta_rows, population)].T  # from the population columns
    return 0.5 * (H + H.T), used


def laplace_whitening(
    logp_grad: LogpGrad, x0: np.ndarray, subject_blocks: Sequence[np.ndarray], *, floor: float = EIGEN_FLOOR
) -> Whitening | None:
    """Mode and whitening (see the module docstring); None when the mode or Hessian is not finite."""
    t0 = time.perf_counter()
    mode, logp_mode, n_opt, converged = find_mode(logp_grad, x0)
    if not np.isfinite(logp_mode):
        return None
    H, n_hess = structured_hessian(logp_grad, mode, subject_blocks)
    if not np.all(np.isfinite(H)):
        return None
    lam, V = np.linalg.eigh(H)
    L = V / np.sqrt(np.maximum(lam, floor))
    return Whitening(mode, L, logp_mode, n_opt + n_hess, time.perf_counter() - t0, converged)


def sign_start(seed: Any, dim: int) -> np.ndarray:
    """A whitened starting point: every coordinate ±1, signs from ``seed``."""
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=dim)


def whitened_model(compiled: Any, w: Whitening) -> Any:
    """A copy of nutpie's compiled model that samples ``u`` (``x = mode + L·u``), starts at
    :func:`sign_start` and stores the draws of ``x`` (nutpie's ``CompiledPyFunc`` hooks)."""
    make_logp, make_expand = compiled._make_logp_func, compiled._make_expand_func  # noqa: SLF001
    L, Lt, mode = w.L, np.ascontiguousarray(w.L.T), w.mode

    def make_logp_func():
        logp = make_logp()

        def whitened(u, **shared):
            value, grad = logp(mode + L @ u, **shared)
            return value, np.ascontiguousarray(Lt @ grad)

        return whitened

    def make_expand_func(seed1, seed2, chain):
        expand = make_expand(seed1, seed2, chain)
        return lambda u, **shared: expand(mode + L @ u, **shared)

    return dataclasses.replace(
        compiled,
        _make_logp_func=make_logp_func,
        _make_expand_func=make_expand_func,
        _make_initial_points=lambda seed: sign_start(seed, mode.size),
    )


def flat_layout(pm_model: Any) -> list[tuple[str, slice, tuple[int, ...]]]:
    """nutpie's flat parameter vector: ``(value variable, slice, shape)`` in nutpie's order.

    nutpie's JAX backend compiles ``freeze_dims_and_data(model)``, whose ``free_RVs`` do not keep the
    original model's order (PyMC 5.2x/6 with nutpie 0.16 reverses it), so the layout is read from the
    frozen model. ``tests/test_warmstart.py`` checks it against nutpie's own log density."""
    from pymc.model.transform.optimization import freeze_dims_and_data

    frozen = freeze_dims_and_data(pm_model)
    point = frozen.initial_point()
    layout, offset = [], 0
    for rv in frozen.free_RVs:
        name = frozen.rvs_to_values[rv].name
        shape = tuple(np.shape(point[name]))
        size = int(np.prod(shape, dtype=int))
        layout.append((name, slice(offset, offset + size), shape))
        offset += size
    return layout


def flatten(point: dict[str, np.ndarray], layout: list[tuple[str, slice, tuple[int, ...]]]) -> np.ndarray:
    """A point (value variable -> array) as nutpie's flat vector."""
    return np.concatenate([np.ravel(point[name]) for name, _, _ in layout]).astype("float64")


def subject_blocks(pm_model: Any) -> list[np.ndarray]:
    """Flat indices (nutpie's layout, :func:`flat_layout`) of each per-subject variable (dims
    ``("subject",)``: the η's), one array per variable in subject order."""
    dims = pm_model.named_vars_to_dims
    return [
        np.arange(sl.start, sl.stop)
        for name, sl, _ in flat_layout(pm_model)
        if tuple(dims.get(name, ())) == ("subject",)
    ]
