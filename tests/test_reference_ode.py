"""Checks of the independent reference solver (tests/reference_ode.py) against science.md §4."""

from __future__ import annotations

import numpy as np
import pytest
from reference_ode import (
    BSV_SD,
    SAMPLING_DAYS,
    TYPICAL,
    car_closed_form,
    draw_parameter_sets,
    jacobian,
    reference_solution,
    rhs,
    sample_times,
)

REFERENCE_TYPICAL = {k: v for k, v in TYPICAL.items() if k != "K_B"}
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


@pytest.mark.parametrize("structure", ["reference", "antigen_driven"])
@pytest.mark.parametrize("below", [True, False])
def test_jacobian_matches_finite_differences(structure: str, below: bool) -> None:
    params = {**TYPICAL, "n_transit": 5}
    rng = np.random.default_rng(3)
    for t in (-4.0, 1.5, 60.0):
        y = rng.uniform(0.1, 80.0, 7)
        jac = jacobian(t, y, params, structure, below)
        numeric = np.empty_like(jac)
        for j in range(y.size):
            h = 1e-6 * max(1.0, abs(y[j]))
            step = np.zeros_like(y)
            step[j] = h
            numeric[:, j] = (
                rhs(t, y + step, params, structure, below) - rhs(t, y - step, params, structure, below)
            ) / (2 * h)
        np.testing.assert_allclose(jac, numeric, rtol=1e-6, atol=1e-7)


def test_antigen_driven_equals_reference_when_b_cells_stay_at_baseline() -> None:
    # No killing and no lymphodepletion keep B = B0, where the antigen-driven expansion is normalised
    # to equal the reference expansion.
    params = {**TYPICAL, "k_kmax": 0.0, "k_LD0": 0.0}
    times = np.linspace(0.0, 120.0, 61)
    car, bcell = reference_solution(params, DL4, times, structure="antigen_driven", rtol=1e-9)
    np.testing.assert_allclose(bcell, params["B0"], rtol=1e-9)
    np.testing.assert_allclose(car, car_closed_form(params, DL4, times), rtol=1e-7)


def test_antigen_driven_expands_less_when_b_cells_are_depleted() -> None:
    times = np.arange(0.0, 28.25, 0.25)
    car_ref, _ = reference_solution(TYPICAL, DL4, times, rtol=1e-8)
    car_ag, bcell = reference_solution(TYPICAL, DL4, times, structure="antigen_driven", rtol=1e-8)
    assert bcell[-1] < TYPICAL["B0"]
    assert car_ag.max() < car_ref.max()


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


def test_sample_times_cover_infusions_and_schedule() -> None:
    doses = [(0.0, 1.0), (7.0, 1.0), (14.0, 1.0)]
    times = sample_times(doses)
    assert times[0] == -5.0 and times[-1] == 365.0
    assert np.all(np.diff(times) > 0)
    needed = [0.0, 7.0, 14.0, 7.0 - 1e-3, -4.0, -3.0, *SAMPLING_DAYS["car"], *SAMPLING_DAYS["bcell"]]
    assert all(np.any(np.isclose(times, t, rtol=0, atol=1e-12)) for t in needed)
