"""Dose search (carnk_pkpd.doses): grids, determinism on Dask, the ranking table, plots and the CLI.

Uses the session fixture ``small_fit`` (a short fit of the SYNTHETIC example cohort) and tiny numbers
of draws and patients; regimens, draws and patients are shared so JAX compiles few shapes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from carnk_pkpd.doses import GridError, default_grid, load_grid, rank_regimens, ranking_table, write_results
from carnk_pkpd.regimen import Regimen

REGIMENS = [Regimen(0.5, 7.0, 3), Regimen(1.0, 7.0, 3), Regimen(3.0, 3.0, 3), Regimen(3.0, 3.0, 3, 0.0)]
N_DRAWS, N_PATIENTS = 6, 4


@pytest.fixture(scope="module")
def ranked(small_fit):
    return rank_regimens(small_fit, REGIMENS, n_draws=N_DRAWS, n_patients=N_PATIENTS, seed=5)


def test_default_grid_contains_trial_dose_levels(small_fit):
    grid = default_grid(small_fit.spec)
    assert len(grid) >= 12
    assert len(set(grid)) == len(grid)
    for dl in small_fit.spec.dose_levels.values():
        assert Regimen(dl.dose, dl.interval, dl.n_infusions) in grid
    assert any(r.ld_scale == 0.0 for r in grid)


def _cluster_run(fit, n_workers: int, seed: int):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=False, dashboard_address=None
    ) as c:
        with Client(c) as client:
            return rank_regimens(
                fit, REGIMENS, n_draws=N_DRAWS, n_patients=N_PATIENTS, seed=seed, client=client
            )


def test_same_seed_same_results_with_1_and_2_workers(small_fit, ranked):
    one = _cluster_run(small_fit, 1, 5)
    two = _cluster_run(small_fit, 2, 5)
    for name in ("p_doris_12m", "pta_da", "cmax_median", "recon_day_median", "utility", "b_traj"):
        np.testing.assert_array_equal(one[name].values, two[name].values)
        np.testing.assert_array_equal(one[name].values, ranked[name].values)  # and without Dask
    np.testing.assert_array_equal(one["p_best"].values, two["p_best"].values)


def test_different_seed_differs(small_fit, ranked):
    other = rank_regimens(small_fit, REGIMENS, n_draws=N_DRAWS, n_patients=N_PATIENTS, seed=6)
    assert not np.array_equal(other["cmax_median"].values, ranked["cmax_median"].values)


def test_dataset_shape_and_probabilities(ranked):
    assert ranked["p_doris_12m"].dims == ("regimen", "draw")
    assert ranked.sizes["regimen"] == len(REGIMENS) and ranked.sizes["draw"] == N_DRAWS
    assert ranked["p_best"].sum().item() == pytest.approx(1.0)
    for name in ("p_doris_6m", "p_doris_12m", "p_lldas_12m", "pta_da", "pta_depleted_d14", "p_cmax_high"):
        v = ranked[name].values
        assert np.all((v >= 0) & (v <= 1)), name
    assert "U = " in ranked.attrs["utility"] and "ASSUMED" in ranked.attrs["remission_source"]


def test_ranking_table_columns_and_ordered_quantiles(ranked):
    df = ranking_table(ranked)
    assert list(df["rank"]) == list(range(1, len(REGIMENS) + 1))
    for col in ("regimen", "dose", "interval", "n_infusions", "ld_scale", "total_cells", "p_best", "utility"):
        assert col in df.columns
    for name in (
        "p_doris_6m",
        "p_doris_12m",
        "p_lldas_6m",
        "p_lldas_12m",
        "pta_da",
        "pta_depleted_d14",
        "cmax_median",
        "recon_day_median",
    ):
        q05, med, q95 = df[f"{name}_q05"], df[f"{name}_median"], df[f"{name}_q95"]
        assert np.all(q05 <= med) and np.all(med <= q95), name
    assert df["utility"].is_monotonic_decreasing
    assert df["p_best"].sum() == pytest.approx(1.0)


def test_more_cells_deplete_at_least_as_deeply(ranked):
    # same posterior draws and virtual patients for every regimen (common random numbers)
    nadir = ranked["b_nadir_median"].values
    cmax = ranked["cmax_median"].values
    assert np.median(nadir[1]) <= np.median(nadir[0])  # 3 x 1e9 vs 3 x 0.5e9, both q7d
    assert np.all(cmax[1] >= cmax[0])
    assert np.median(ranked["da_median"].values[2]) >= np.median(ranked["da_median"].values[0])


def test_write_results_writes_plots_and_csv(ranked, tmp_path):
    dest = write_results(ranked, tmp_path / "out")
    for name in ("ranking.csv", "remission_vs_dose.png", "trajectories.png", "about.txt", "doses.nc"):
        assert (dest / name).stat().st_size > 0, name
    assert (dest / "remission_vs_dose.png").read_bytes()[:4] == b"\x89PNG"
    assert "SYNTHETIC" in (dest / "about.txt").read_text(encoding="utf-8")
    df = pd.read_csv(dest / "ranking.csv", comment="#")
    assert len(df) == len(REGIMENS)


def test_grid_text_and_yaml(tmp_path):
    assert load_grid("1:7:3, 2:3:3:0.5") == [Regimen(1.0, 7.0, 3), Regimen(2.0, 3.0, 3, 0.5)]
    f = tmp_path / "g.yaml"
    f.write_text(
        "regimens:\n  - {dose: 1, interval: 7, n_infusions: 3}\n"
        "grid: {dose: [1, 2], interval: 3, n_infusions: [2, 3], ld_scale: [1, 0]}\n",
        encoding="utf-8",
    )
    regs = load_grid(f)
    assert len(regs) == 1 + 2 * 2 * 2
    assert Regimen(2.0, 3.0, 2, 0.0) in regs


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("regimens:\n  - {dose: 1, interval: 7}\n", "regimens[0].n_infusions"),
        ("regimens:\n  - {dose: 1, interval: 7, n_infusions: 3, dosis: 2}\n", "regimens[0].dosis"),
        ("regimens:\n  - {dose: one, interval: 7, n_infusions: 3}\n", "regimens[0].dose"),
        ("regimes: []\n", "regimes"),
    ],
)
def test_bad_grid_names_file_and_key(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(GridError) as e:
        load_grid(f)
    assert str(f) in str(e.value) and key in str(e.value)


def test_cli_writes_atomically(small_fit, tmp_path):
    from typer.testing import CliRunner

    from carnk_pkpd.cli import app

    out = tmp_path / "doses" / "small"
    args = [
        "doses",
        str(small_fit.path),
        "--out",
        str(out),
        "--grid",
        "0.5:7:3,1:7:3,3:3:3,3:3:3:0",
        "--draws",
        str(N_DRAWS),
        "--patients",
        str(N_PATIENTS),
        "--seed",
        "5",
        "--workers",
        "1",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output
    df = pd.read_csv(out / "ranking.csv", comment="#")
    assert set(df["regimen"]) == {"3x0.5e9 q7d", "3x1e9 q7d", "3x3e9 q3d", "3x3e9 q3d noLD"}
    # a second run replaces the folder; no temporary folder is left behind
    res = CliRunner().invoke(app, [*args[:-2], "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["small"]
    assert pd.read_csv(out / "ranking.csv", comment="#").equals(df)


def test_cli_bad_grid_exits_1(small_fit, tmp_path):
    from typer.testing import CliRunner

    from carnk_pkpd.cli import app

    bad = tmp_path / "grid.yaml"
    bad.write_text("regimens:\n  - {dose: 1, interval: -7, n_infusions: 3}\n", encoding="utf-8")
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["doses", str(small_fit.path), "--grid", str(bad), "--out", str(out)])
    assert res.exit_code == 1
    assert str(bad) in res.output and "regimens[0].interval" in res.output
    assert not out.exists()
