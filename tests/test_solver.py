"""The JAX solver of the B lineage (carnk_pkpd.structural.solve) against the independent Radau reference.

The reference (tests/reference_ode.py) integrates science.md §4 with scipy's Radau at rtol 1e-10, piece by
piece between lymphodepletion days, infusions and the kink of F(B). The stress sets are 100 parameter
sets at twice the table's BSV plus corners (k_kmax to 20/d, EC50 to 0.05/µL, F_max to 5, MTT 20–120 d,
n_transit 2–24, τ 1–14 d, 1–6 infusions); every sample time from day −5 to day 365 is checked.

Budget: the reference solves (~1 s each) run once, in worker processes started when this module is set
up, so that they run while JAX compiles; the package solves are batched by n_transit (one JAX compile per
chain length and accuracy), every subject with its own regimen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_ode import (
    SAMPLING_DAYS,
    TYPICAL,
    TYPICAL_STEIN,
    car_closed_form,
    draw_parameter_sets,
    sample_times,
    solve_case,
    worker_pool,
)

from carnk_pkpd.structural import derived_metrics, simulate
from carnk_pkpd.structural.solve import length_buckets, make_grid, solve

#: |package − reference| ≤ rel·|reference| + abs (cells/µL), the contract of ``simulate(accuracy=...)``.
TOLERANCE = {"default": (1e-3, 1e-3), "tight": (1e-6, 1e-8)}
STRESS_SETS = draw_parameter_sets(100, seed=0)
STEIN_SETS = draw_parameter_sets(12, seed=1, structure="stein")
DL4 = [(0.0, 3.0), (3.0, 3.0), (6.0, 3.0)]
DL1 = [(0.0, 0.75), (7.0, 0.75), (14.0, 0.75)]
#: Sets whose derived events (aplasia, return, reconstitution) are checked on a fine reference grid.
METRIC_CASES = {
    "typical DL4": (TYPICAL, DL4),
    "typical DL1": (TYPICAL, DL1),
    "slow chain, weak boost": ({**TYPICAL, "MTT": 80.0, "F_max": 0.5, "B0": 40.0}, [(0.0, 2.0), (3.0, 2.0)]),
}
FINE_STEP = 0.01  # days, the reference grid for derived events
FINE_TIMES = np.arange(0.0, 365.0 + FINE_STEP / 2, FINE_STEP)


@pytest.fixture(scope="module", autouse=True)
def reference_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, list[Future]]]:
    """Radau solves of the stress, Stein and derived-event sets, submitted to worker processes as soon as
    the module is set up (only those the selected tests use); tests collect them with ``.result()``."""
    used = {
        name for item in request.session.items if item.module is request.module for name in item.fixturenames
    }
    jobs = {
        "stress": (STRESS_SETS, "reference", None),
        "stein": (STEIN_SETS, "stein", None),
        "fine_references": (list(METRIC_CASES.values()), "reference", FINE_TIMES),
    }
    pool = worker_pool()
    runs = {
        key: [pool.submit(solve_case, params, doses, structure, times) for params, doses in sets]
        for key, (sets, structure, times) in jobs.items()
        if key in used
    }
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


# --- gradients first: they need no reference solves, which run meanwhile ---------------------------

PARAMETERS = [k for k in TYPICAL if k != "n_transit"]
STEIN_PARAMETERS = [k for k in TYPICAL_STEIN if k != "n_transit"]


def _log_exposure_functional(sets: list, structure: str = "reference"):
    """Per subject, Σ over sample times of log(B + 1) + log(N + 10⁻³), as a function of log-parameters.

    Smooth in the parameters wherever no node's B sits exactly at B0 (the kink of F(B)); for ``stein``,
    samples at the end of an expansion (t_j + T_exp, where N has a kink in T_exp) are left out. The grid
    is fixed data, built once, as in a fit.
    """
    n_transit = int(sets[0][0]["n_transit"])
    assert all(int(p["n_transit"]) == n_transit for p, _ in sets)
    names = STEIN_PARAMETERS if structure == "stein" else PARAMETERS
    theta = {k: np.array([p[k] for p, _ in sets]) for k in names}
    doses = [d for _, d in sets]
    times = []
    for params, regimen in sets:
        t = sample_times(regimen, step=1.0)
        if structure == "stein":
            ends = np.array([t_j + params["T_exp"] for t_j, _ in regimen])
            t = t[np.min(np.abs(t[:, None] - ends[None, :]), axis=1) > 1e-6]
        times.append(t)
    grid = make_grid(doses, times, "default", k_tr=n_transit / theta["MTT"])
    mask = jnp.asarray(grid.mask)

    @jax.jit
    def per_subject(log_theta: dict) -> jnp.ndarray:
        car, bcell = solve(
            {k: jnp.exp(v) for k, v in log_theta.items()}, grid, n_transit=n_transit, structure=structure
        )
        return jnp.sum(jnp.where(mask, jnp.log(bcell + 1.0) + jnp.log(car + 1e-3), 0.0), axis=1)

    return per_subject, {k: jnp.log(v) for k, v in theta.items()}


def _compare_with_differences(per_subject, log_theta: dict, grad: dict, eps: float = 1e-5) -> int:
    """Assert that each d(functional)/d(log parameter) of each subject matches finite differences.

    The reference is the central difference; where a kink of F(B) (B = B0 at some node) lies within ±eps
    of the parameter, the central difference mixes both sides and the check falls back to the forward or
    the backward difference. Returns how many (subject, parameter) pairs needed that fallback.
    """
    base = np.asarray(per_subject(log_theta))
    fallbacks = 0
    for name, value in log_theta.items():
        g = np.asarray(grad[name])
        assert np.all(np.isfinite(g)), name
        up = np.asarray(per_subject({**log_theta, name: value + eps}))
        down = np.asarray(per_subject({**log_theta, name: value - eps}))
        central, forward, backward = (up - down) / (2 * eps), (up - base) / eps, (base - down) / eps
        tol = 1e-4 * np.abs(central) + 1e-6
        ok = np.abs(g - central) <= tol
        one_sided = np.minimum(np.abs(g - forward), np.abs(g - backward)) <= tol
        bad = np.flatnonzero(~(ok | one_sided))
        assert bad.size == 0, [(f"subject {i}", name, g[i], central[i]) for i in bad]
        fallbacks += int(np.sum(~ok))
    return fallbacks


@pytest.mark.parametrize("n_transit", [2, 6, 24])
def test_reverse_mode_gradient_matches_finite_differences_over_the_stress_range(n_transit: int) -> None:
    # all 100 stress parameter sets and regimens as one cohort, on the shortest, typical and longest chain
    sets = [({**params, "n_transit": n_transit}, doses) for params, doses in STRESS_SETS]
    per_subject, log_theta = _log_exposure_functional(sets)
    grad = jax.jit(jax.grad(lambda lt: jnp.sum(per_subject(lt))))(log_theta)  # subjects are independent
    fallbacks = _compare_with_differences(per_subject, log_theta, grad)
    assert fallbacks <= 0.01 * len(sets) * len(log_theta)  # kinks of F(B) are rare
    for name, g in grad.items():
        assert np.any(np.asarray(g) != 0.0), name  # every parameter acts on the outputs


def test_reverse_mode_gradient_matches_finite_differences_for_stein_kinetics() -> None:
    sets = [({**params, "n_transit": 6}, doses) for params, doses in STEIN_SETS]
    per_subject, log_theta = _log_exposure_functional(sets, "stein")
    grad = jax.jit(jax.grad(lambda lt: jnp.sum(per_subject(lt))))(log_theta)
    assert _compare_with_differences(per_subject, log_theta, grad) <= 0.01 * len(sets) * len(log_theta)


def test_fitted_weights_and_their_derivative_match_quadrature() -> None:
    # W[j, k] = ∫_0^{c_j} e^{z v} L_k(v) dv and dW/dz = ∫ v e^{z v} L_k(v) dv, by scipy's adaptive quadrature,
    # on both sides of the series/recurrence switch at |z| = 0.05 and for strong decay and growth
    from scipy.integrate import quad

    from carnk_pkpd.structural.solve import _UPPER, LAGRANGE, fitted_weights

    def lagrange(k: int, v: float) -> float:
        return float(sum(LAGRANGE[k, m] * v**m for m in range(3)))

    zs = np.array([-30.0, -3.0, -0.0501, -0.0499, -1e-9, 0.0, 0.02, 0.0501, 1.5, 12.0])
    weights = np.asarray(fitted_weights(jnp.asarray(zs)))
    slopes = np.asarray(jax.vmap(jax.jacfwd(fitted_weights))(jnp.asarray(zs)))
    for i, z in enumerate(zs):
        for j, c in enumerate(_UPPER):
            for k in range(3):
                w = quad(
                    lambda v, k=k, z=z: np.exp(z * v) * lagrange(k, v), 0.0, c, epsabs=1e-14, epsrel=1e-13
                )[0]
                d = quad(
                    lambda v, k=k, z=z: v * np.exp(z * v) * lagrange(k, v), 0.0, c, epsabs=1e-14, epsrel=1e-13
                )[0]
                scale = np.exp(max(z, 0.0) * c)  # the integrals grow like e^{z c}
                assert abs(weights[i, j, k] - w) <= 1e-11 * scale, (z, j, k, weights[i, j, k], w)
                assert abs(slopes[i, j, k] - d) <= 1e-9 * scale, (z, j, k, slopes[i, j, k], d)


def test_a_fit_grid_solved_in_length_groups_gives_the_same_values_and_gradient() -> None:
    # subjects with 1 to 6 infusions and follow-up from 28 to 365 days: their node counts differ, so the
    # compact solve groups them by length and pads each group only to its longest member
    sets = STRESS_SETS[:12]
    params = {k: jnp.asarray([p[k] for p, _ in sets]) for k in sets[0][0] if k != "n_transit"}
    follow_up = [28.0, 56.0, 90.0, 120.0, 180.0, 365.0] * 2
    times = [np.array([d for d in SAMPLING_DAYS["bcell"] if d <= end]) for end in follow_up]
    grid = make_grid([d for _, d in sets], times, "default", k_tr=0.5, bucket=1)
    assert len({int(np.sum(np.diff(row) > 0)) for row in grid.nodes}) > 1  # padding is there to skip
    groups = length_buckets(grid.nodes)
    assert len(groups) > 1  # the grouped path is the one exercised
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(sets)))  # each subject once

    def total(theta, compact):
        return jnp.sum(jnp.log1p(solve(theta, grid, n_transit=6, compact=compact)[1]))

    padded = np.asarray(solve(params, grid, n_transit=6, compact=False)[1])
    compact = np.asarray(solve(params, grid, n_transit=6, compact=True)[1])
    np.testing.assert_allclose(compact, padded, rtol=1e-12, atol=1e-12)
    g_pad = jax.grad(lambda th: total(th, False))(params)
    g_com = jax.grad(lambda th: total(th, True))(params)
    for name in params:
        np.testing.assert_allclose(np.asarray(g_com[name]), np.asarray(g_pad[name]), rtol=1e-10, atol=1e-14)


def test_batched_simulation_gives_each_subject_its_unbatched_values() -> None:
    # 12 subjects in batches of 5 (the last one padded) inside one compiled loop, each with its own
    # regimen and LD window; every subject's nodes must equal one solve of all 12 at once
    from carnk_pkpd.structural.carnk import trial_ld
    from carnk_pkpd.structural.solve import solve_nodes, solve_nodes_batched

    sets = [s for s in STRESS_SETS if s[0]["n_transit"] == 6][:12]
    params = {k: np.array([p[k] for p, _ in sets]) for k in sets[0][0] if k != "n_transit"}
    grid = make_grid([d for _, d in sets], [np.array([7.0, 90.0, 365.0])] * len(sets), "default", k_tr=0.5)
    ld = trial_ld(len(sets))
    ld["start"] = ld["start"] - np.arange(len(sets)) % 3  # LD starting on day -5, -6 or -7
    kwargs = dict(n_transit=6, sweeps=grid.sweeps)
    whole = np.asarray(solve_nodes(params, grid.nodes, grid.dose_times, grid.dose_amounts, ld=ld, **kwargs))
    batched = solve_nodes_batched(
        params, grid.nodes, grid.dose_times, grid.dose_amounts, batch=5, ld=ld, **kwargs
    )
    assert batched.shape == whole.shape
    np.testing.assert_allclose(batched, whole, rtol=1e-12, atol=1e-12)


# --- infusions and the calibration target ----------------------------------------------------------------


def test_a_sample_at_an_infusion_time_includes_that_infusion() -> None:
    times = np.array([3.0 - 1e-6, 3.0, 6.0 - 1e-6, 6.0])
    ds = simulate(None, DL4, times, accuracy="tight")
    car, bcell = ds["car"].values, ds["bcell"].values
    increment = TYPICAL["f_bl"] * 3.0e9 / TYPICAL["V_bl"]  # 12 cells/µL per 3×10⁹ cells
    assert car[1] - car[0] == pytest.approx(increment, rel=1e-4)
    assert car[3] - car[2] == pytest.approx(increment, rel=1e-4)
    np.testing.assert_allclose(bcell[1::2], bcell[0::2], rtol=1e-4)  # B is continuous there
    grid = make_grid([DL4], [times], "default")
    assert grid.nodes[0, grid.out_index[0]].tolist() == times.tolist()  # every sample is a node


@pytest.mark.parametrize("model", ["reference", "stein"])
def test_typical_dl4_reconstitutes_b_cells_in_two_to_three_months(model: str) -> None:
    # ACR 2024 abstract L17: B cells reconstituted 2–3 months after treatment (science.md §1, §4)
    got = derived_metrics(None, DL4, model)
    assert 60.0 <= float(got["reconstitution_day"]) <= 90.0
    assert float(got["b_nadir"]) < 1.0  # aplasia first


# --- accuracy against the Radau reference on the stress sets ------------------------------------------


def _by_chain_length(sets: list) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (params, _) in enumerate(sets):
        groups[int(params["n_transit"])].append(i)
    return dict(groups)


def _package_solutions(
    sets: list, accuracy: str, model: str = "reference", days: np.ndarray | None = None
) -> list:
    """``simulate`` per n_transit group (one batch, a regimen per subject) at each set's sample times,
    or at ``days`` only (then the grid has nodes at those days alone, as in a fit)."""
    out: list = [None] * len(sets)
    for n_transit, idx in _by_chain_length(sets).items():
        own = [sample_times(sets[i][1]) if days is None else days for i in idx]
        times = np.unique(np.concatenate(own))
        names = [k for k in sets[idx[0]][0] if k != "n_transit"]
        params = {k: np.array([sets[i][0][k] for i in idx]) for k in names}
        ds = simulate(
            {**params, "n_transit": n_transit}, [sets[i][1] for i in idx], times, model, accuracy=accuracy
        )
        for row, (i, t) in enumerate(zip(idx, own, strict=True)):
            at = np.searchsorted(times, t)
            out[i] = (ds["car"].values[row, at], ds["bcell"].values[row, at])
    return out


@pytest.fixture(scope="module")
def stress(reference_runs: dict) -> dict:
    """Package (default and tight) and reference solutions of the 100 stress sets."""
    package = {acc: _package_solutions(STRESS_SETS, acc) for acc in TOLERANCE}
    return {"reference": [f.result() for f in reference_runs["stress"]], **package}


def _worst_errors(references: list, package: list, accuracy: str) -> list[tuple[float, int, float]]:
    """(error / tolerance, set index, day) per set, worst first."""
    rel, abs_ = TOLERANCE[accuracy]
    rows = []
    for i, ((times, _, b_ref), (_, b_pkg)) in enumerate(zip(references, package, strict=True)):
        ratio = np.abs(b_pkg - b_ref) / (rel * np.abs(b_ref) + abs_)
        k = int(np.argmax(ratio))
        rows.append((float(ratio[k]), i, float(times[k])))
    return sorted(rows, reverse=True)


@pytest.mark.parametrize("accuracy", ["default", "tight"])
def test_b_cells_within_accuracy_contract_against_radau_on_stress_sets(stress: dict, accuracy: str) -> None:
    worst = _worst_errors(stress["reference"], stress[accuracy], accuracy)
    print(f"{accuracy}: worst error / tolerance {worst[0][0]:.3g} (set {worst[0][1]}, day {worst[0][2]})")
    failing = [(f"set {i}", f"day {t}", f"{r:.3g}x tolerance") for r, i, t in worst if r > 1.0]
    assert not failing, failing
    assert len(worst) == len(STRESS_SETS) >= 100


def test_b_cells_within_the_default_contract_when_only_the_trial_sampling_days_are_requested(
    stress: dict,
) -> None:
    # A fit asks for the sampling days only, so its grid has no half-day nodes: the steps are as long as
    # the accuracy settings allow. The references were solved at every half day, which includes them.
    days = np.array(sorted(set(SAMPLING_DAYS["bcell"]) | set(SAMPLING_DAYS["car"])), float)
    package = _package_solutions(STRESS_SETS, "default", days=days)
    rel, abs_ = TOLERANCE["default"]
    failing = []
    for i, ((times, _, b_ref), (_, b_pkg)) in enumerate(zip(stress["reference"], package, strict=True)):
        ref = b_ref[np.searchsorted(times, days)]
        ratio = np.abs(b_pkg - ref) / (rel * np.abs(ref) + abs_)
        if ratio.max() > 1.0:
            failing.append(
                (f"set {i}", f"day {days[int(np.argmax(ratio))]}", f"{ratio.max():.3g}x tolerance")
            )
    assert not failing, failing


def test_car_nk_equals_the_integrated_reference_n(stress: dict) -> None:
    # the reference integrates dN/dt; the package evaluates N's closed form
    for i, ((times, car_ref, _), (car_pkg, _)) in enumerate(
        zip(stress["reference"], stress["default"], strict=True)
    ):
        params, doses = STRESS_SETS[i]
        big = car_ref > 1e-8  # where Radau (atol 1e-20, rtol 1e-10) resolves N to 1e-9 relative
        np.testing.assert_allclose(car_pkg[big], car_ref[big], rtol=1e-9, atol=0, err_msg=f"set {i}")
        np.testing.assert_allclose(car_pkg[~big], car_ref[~big], rtol=0, atol=1e-16, err_msg=f"set {i}")
        np.testing.assert_allclose(car_pkg, car_closed_form(params, doses, times), rtol=1e-12, atol=1e-300)


def test_no_nan_or_inf_and_no_negative_cells_on_stress_sets(stress: dict) -> None:
    for accuracy in TOLERANCE:
        for i, (car, bcell) in enumerate(stress[accuracy]):
            assert np.all(np.isfinite(car)) and np.all(np.isfinite(bcell)), (accuracy, i)
            assert car.min() >= 0.0 and bcell.min() > -1e-12, (accuracy, i)


# --- the Stein structure -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stein(reference_runs: dict) -> dict:
    package = {acc: _package_solutions(STEIN_SETS, acc, "stein") for acc in TOLERANCE}
    return {"reference": [f.result() for f in reference_runs["stein"]], **package}


@pytest.mark.parametrize("accuracy", ["default", "tight"])
def test_stein_structure_within_accuracy_contract_against_radau(stein: dict, accuracy: str) -> None:
    worst = _worst_errors(stein["reference"], stein[accuracy], accuracy)
    print(
        f"stein {accuracy}: worst error / tolerance {worst[0][0]:.3g} (set {worst[0][1]}, day {worst[0][2]})"
    )
    assert worst[0][0] <= 1.0, worst[:3]
    for (_, car_ref, _), (car_pkg, bcell) in zip(stein["reference"], stein[accuracy], strict=True):
        np.testing.assert_allclose(car_pkg, car_ref, rtol=1e-12, atol=1e-300)  # both closed forms
        assert np.all(np.isfinite(bcell))


# --- derived events ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_references(reference_runs: dict) -> dict:
    """Reference N and B every FINE_STEP days from day 0 to 365, for the derived-event checks."""
    return {case: f.result() for case, f in zip(METRIC_CASES, reference_runs["fine_references"], strict=True)}


def _first_return(times: np.ndarray, bcell: np.ndarray, threshold: float) -> float:
    """First day B reaches ``threshold`` after having been below it (linear between fine samples)."""
    below = np.flatnonzero(bcell < threshold)
    j = below[0] + np.flatnonzero(bcell[below[0] :] >= threshold)[0]
    return float(np.interp(threshold, bcell[j - 1 : j + 1], times[j - 1 : j + 1]))


@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_derived_events_match_the_reference_on_a_fine_grid(case: str, fine_references: dict) -> None:
    params, doses = METRIC_CASES[case]
    times, car, bcell = fine_references[case]
    got = derived_metrics(params, doses)
    in_window = times <= 180.0
    expected_da = float(np.sum(bcell[in_window][:-1] < 1.0) * FINE_STEP)
    assert got["DA"] == pytest.approx(expected_da, abs=0.1)
    assert got["reappearance_day"] == pytest.approx(_first_return(times, bcell, 1.0), abs=0.1)
    assert got["reconstitution_day"] == pytest.approx(_first_return(times, bcell, 10.0), abs=0.1)
    assert got["b_nadir"] == pytest.approx(bcell.min(), rel=0.02, abs=1e-3)
    early = times <= 28.0
    assert got["car_cmax"] == pytest.approx(car[early].max(), rel=1e-6)
    assert got["car_tmax"] == pytest.approx(times[early][np.argmax(car[early])], abs=0.01)
    assert got["car_auc_0_28"] == pytest.approx(np.trapezoid(car[early], times[early]), rel=1e-3)
