"""Checks of the independent reference solver (tests/reference_ode.py) against science.md §4 and, for the
Stein structure, against the effector/persisting-cell ODEs of Stein et al. 2019."""

from __future__ import annotations

import numpy as np
import pytest
from reference_ode import (
    BSV_SD,
    N_TRANSIT_LADDER,
    SAMPLING_DAYS,
    TYPICAL,
    TYPICAL_STEIN,
    car_closed_form,
    draw_parameter_sets,
    jacobian,
    reference_solution,
    rhs,
    sample_times,
)
from scipy.integrate import solve_ivp

REFERENCE_TYPICAL = TYPICAL
DL4 = [(0.0, 3.0), (3.0, 3.0), (6.0, 3.0)]

# Typical values + DL4, the two harshest corners, and one random draw at twice the table's BSV.
_SETS = draw_parameter_sets(6, seed=11)
CLOSED_FORM_CASES = [_SETS[0], _SETS[1], _SETS[2], _SETS[5]]


@pytest.mark.parametrize("case", range(len(CLOSED_FORM_CASES)))
def test_integrated_car_matches_closed_form(case: int) -> None:
    params, doses = CLOSED_FORM_CASES[case]
    times = sample_times(doses)
    car, bcell = reference_solution(params, doses, times)
    expected = car_closed_form(params, doses, times)
    assert np.all(np.isfinite(bcell))
    assert bcell.min() > -1e-9
    big = expected > 1e-8  # the relative check holds where N is far above atol_car / rtol
    np.testing.assert_allclose(car[big], expected[big], rtol=1e-9, atol=0)
    np.testing.assert_allclose(car[~big], expected[~big], rtol=0, atol=1e-16)


def test_infusion_sample_is_right_continuous() -> None:
    params = REFERENCE_TYPICAL
    times = np.array([-1.0, 0.0, 3.0 - 1e-9, 3.0, 6.0])
    car, _ = reference_solution(params, DL4, times)
    increment = params["f_bl"] * 3.0 * 1e9 / params["V_bl"]  # 12 cells/µL per 3×10⁹ cells
    assert car[0] == 0.0
    assert car[1] == pytest.approx(increment, rel=1e-12)
    assert car[3] - car[2] == pytest.approx(increment, rel=1e-6)


def test_b_lineage_stays_at_steady_state_before_lymphodepletion() -> None:
    times = np.array([-30.0, -10.0, -5.0, -4.9])
    car, bcell = reference_solution(REFERENCE_TYPICAL, [], times)
    assert np.all(bcell[:3] == REFERENCE_TYPICAL["B0"])
    assert bcell[3] < REFERENCE_TYPICAL["B0"]
    assert np.all(car == 0.0)


def test_steady_state_is_an_equilibrium_without_lymphodepletion() -> None:
    params = {**REFERENCE_TYPICAL, "k_LD0": 0.0}
    times = np.linspace(-5.0, 365.0, 75)
    _, bcell = reference_solution(params, [], times)
    np.testing.assert_allclose(bcell, params["B0"], rtol=1e-9)


def test_lymphodepletion_alone_depresses_then_restores_b_cells() -> None:
    params = REFERENCE_TYPICAL
    times = np.arange(-5.0, 365.25, 0.5)
    car, bcell = reference_solution(params, [], times)
    nadir = int(np.argmin(bcell))
    assert np.max(np.abs(car)) < 1e-15
    assert bcell[nadir] < 0.1 * params["B0"]
    assert -3.0 < times[nadir] < 30.0
    assert abs(bcell[-1] - params["B0"]) < 0.05 * params["B0"]


def test_b_cells_return_in_two_to_three_months_after_dl4() -> None:
    times = np.arange(-5.0, 365.25, 0.25)
    car, bcell = reference_solution(REFERENCE_TYPICAL, DL4, times)
    nadir = int(np.argmin(bcell))
    back = np.flatnonzero((times > times[nadir]) & (bcell >= 10.0))
    reconstitution_day = float(times[back[0]])
    print(
        f"typical DL4: CAR-NK Cmax {car.max():.1f}/µL, B nadir {bcell[nadir]:.2g}/µL, B >= 10/µL at day {reconstitution_day}"
    )
    # science.md §4 calibration: median ~day 72 (IQR ~62-83), "2-3 months".
    assert 40.0 <= reconstitution_day <= 120.0
    assert bcell[nadir] < 1.0  # aplasia


@pytest.mark.parametrize("structure", ["reference", "stein"])
@pytest.mark.parametrize("below", [True, False])
def test_jacobian_matches_finite_differences(structure: str, below: bool) -> None:
    params = {**(TYPICAL_STEIN if structure == "stein" else TYPICAL), "n_transit": 5}
    rng = np.random.default_rng(3)
    for t in (-4.0, 1.5, 4.0, 60.0):
        y = rng.uniform(0.1, 80.0, 7)
        jac = jacobian(t, y, params, structure, below, DL4)
        numeric = np.empty_like(jac)
        for j in range(y.size):
            h = 1e-6 * max(1.0, abs(y[j]))
            step = np.zeros_like(y)
            step[j] = h
            numeric[:, j] = (
                rhs(t, y + step, params, structure, below, DL4)
                - rhs(t, y - step, params, structure, below, DL4)
            ) / (2 * h)
        np.testing.assert_allclose(jac, numeric, rtol=1e-6, atol=1e-7)


def _stein_by_effector_and_persisting_odes(params: dict, doses: list, times: np.ndarray) -> np.ndarray:
    """Stein et al. 2019 per infusion: E' = ρE until T_exp, then E' = −αE, M' = F_mem(α − β)E − βM."""
    rho, t_exp, alpha, beta, f_mem = (params[k] for k in ("rho", "T_exp", "alpha", "beta", "F_mem"))
    total = np.zeros_like(times)
    for t_j, amount in doses:
        n0 = params["f_bl"] * amount * 1e9 / params["V_bl"]
        u = times - t_j
        up = (u >= 0) & (u <= t_exp)
        grow = solve_ivp(lambda _u, e: rho * e, (0.0, t_exp), [n0], t_eval=u[up], rtol=1e-12, atol=1e-30)
        total[up] += grow.y[0]
        peak = solve_ivp(lambda _u, e: rho * e, (0.0, t_exp), [n0], rtol=1e-12, atol=1e-30).y[0, -1]
        down = u > t_exp

        def contract(_s: float, y: np.ndarray) -> list[float]:
            return [-alpha * y[0], f_mem * (alpha - beta) * y[0] - beta * y[1]]

        after = solve_ivp(
            contract, (0.0, u.max() - t_exp), [peak, 0.0], t_eval=u[down] - t_exp, rtol=1e-12, atol=1e-30
        )
        total[down] += after.y.sum(axis=0)
    return total


def test_stein_closed_form_solves_the_effector_and_persisting_cell_odes() -> None:
    params = {**TYPICAL_STEIN, "F_mem": 0.2, "beta": 0.03}  # a visible persisting tail
    doses = [(0.0, 3.0), (3.0, 3.0), (6.0, 3.0)]
    times = np.linspace(0.0, 200.0, 401)
    expected = _stein_by_effector_and_persisting_odes(params, doses, times)
    np.testing.assert_allclose(car_closed_form(params, doses, times, structure="stein"), expected, rtol=1e-8)
    # the Radau reference carries that closed form through unchanged
    car, _ = reference_solution(params, doses, times, structure="stein", rtol=1e-8)
    np.testing.assert_allclose(car, expected, rtol=1e-8)


def test_stein_and_reference_b_lineages_agree_without_car_nk_killing() -> None:
    # with k_kmax = 0 only lymphodepletion acts on B: the CAR-NK structure must not matter
    times = np.arange(-5.0, 200.0, 2.5)
    _, b_ref = reference_solution({**TYPICAL, "k_kmax": 0.0}, DL4, times, rtol=1e-9)
    _, b_stein = reference_solution(
        {**TYPICAL_STEIN, "k_kmax": 0.0}, DL4, times, structure="stein", rtol=1e-9
    )
    np.testing.assert_allclose(b_stein, b_ref, rtol=1e-7)


def test_stein_typical_dl4_returns_b_cells_in_two_to_three_months() -> None:
    times = np.arange(-5.0, 200.0, 0.25)
    car, bcell = reference_solution(TYPICAL_STEIN, DL4, times, structure="stein", rtol=1e-8)
    back = np.flatnonzero((times > times[np.argmin(bcell)]) & (bcell >= 10.0))
    assert 60.0 <= times[back[0]] <= 90.0
    assert bcell.min() < 1.0  # aplasia
    assert 30.0 < car.max() < 60.0  # like the reference model's ~44 cells/µL at DL4


def test_draw_parameter_sets_cover_the_stress_ranges() -> None:
    sets = draw_parameter_sets(seed=5)
    assert len(sets) >= 100
    assert draw_parameter_sets(8, seed=5) == sets[:8]
    col = {
        name: np.array([p[name] for p, _ in sets]) for name in ("k_kmax", "EC50", "F_max", "MTT", "n_transit")
    }
    assert col["k_kmax"].max() == 20.0
    assert col["EC50"].min() == 0.05
    assert col["F_max"].max() == 5.0
    assert col["MTT"].min() == 20.0 and col["MTT"].max() == 120.0
    assert col["n_transit"].min() == 2 and col["n_transit"].max() == 24
    assert set(col["n_transit"]) <= set(N_TRANSIT_LADDER)
    n_doses = [len(d) for _, d in sets]
    assert min(n_doses) == 1 and max(n_doses) == 6
    for _, doses in sets:
        times = np.array([t for t, _ in doses])
        amounts = np.array([a for _, a in doses])
        assert times[0] == 0.0
        if len(times) > 1:
            gaps = np.diff(times)
            np.testing.assert_allclose(gaps, gaps[0])
            assert 1.0 <= gaps[0] <= 14.0
        assert np.all((amounts >= 0.75) & (amounts <= 3.0)) and np.all(amounts == amounts[0])
    # the random draws spread f_bl at twice the table's log-SD (0.5 -> 1.0)
    log_f = np.log([p["f_bl"] for p, _ in sets[5:]] / np.float64(TYPICAL["f_bl"]))
    assert 0.7 < log_f.std() < 1.3
    assert BSV_SD["f_bl"] == 0.5


def test_stein_draws_cover_short_and_long_expansion() -> None:
    sets = draw_parameter_sets(40, seed=5, structure="stein")
    col = {name: np.array([p[name] for p, _ in sets]) for name in ("T_exp", "F_mem", "beta", "k_kmax")}
    assert col["T_exp"].min() == 0.25 and col["T_exp"].max() == 10.0
    assert col["F_mem"].max() == 0.5 and col["beta"].min() == 0.01 and col["k_kmax"].max() == 20.0
    assert all(set(p) == set(TYPICAL_STEIN) for p, _ in sets)


def test_sample_times_cover_infusions_and_schedule() -> None:
    doses = [(0.0, 1.0), (7.0, 1.0), (14.0, 1.0)]
    times = sample_times(doses)
    assert times[0] == -5.0 and times[-1] == 365.0
    assert np.all(np.diff(times) > 0)
    needed = [0.0, 7.0, 14.0, 7.0 - 1e-3, -4.0, -3.0, *SAMPLING_DAYS["car"], *SAMPLING_DAYS["bcell"]]
    assert all(np.any(np.isclose(times, t, rtol=0, atol=1e-12)) for t in needed)
