"""The shipped variants of the reference model: dose-level tier on f_bl, DOSE power covariate on f_bl."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from carnk_pkpd.data import embedded_cohort_path, read_cohort
from carnk_pkpd.spec import load_model
from carnk_pkpd.statistical import build_model, observation_data


@pytest.fixture(scope="module")
def data():
    return observation_data(read_cohort(embedded_cohort_path("example")))  # SYNTHETIC, DL 1, 3, 4


def _same_except(a, b, skip: set[str]) -> None:
    assert a.structure == b.structure and list(a.parameters) == list(b.parameters)
    for name in a.parameters:
        pa, pb = dataclasses.asdict(a.parameters[name]), dataclasses.asdict(b.parameters[name])
        for key in pa:
            if (name, key) not in skip and key != "source":
                assert pa[key] == pb[key], (name, key)
    assert a.observations == b.observations


def test_variants_differ_from_reference_only_where_stated():
    ref, dl, cov = load_model("reference"), load_model("reference_dl"), load_model("reference_dose_cov")
    assert (dl.name, cov.name) == ("reference_dl", "reference_dose_cov")
    _same_except(ref, dl, {("f_bl", "dose_level_tier")})
    assert [p for p, par in dl.parameters.items() if par.dose_level_tier] == ["f_bl"]
    assert not any(par.dose_level_tier for par in ref.parameters.values())
    _same_except(ref, cov, set())
    assert not ref.covariates
    [c] = cov.covariates
    assert (c.parameter, c.covariate.upper(), c.form, c.center) == ("f_bl", "DOSE", "power", "median")


def _individual_f_bl(model, values: dict[str, np.ndarray]) -> np.ndarray:
    point = {}
    for rv in model.free_RVs:
        v = values.get(rv.name, np.zeros(tuple(int(s) for s in rv.shape.eval())))
        tr = model.rvs_to_transforms.get(rv)
        point[model.rvs_to_values[rv].name] = tr.forward(v).eval() if tr is not None else v
    [graph] = model.replace_rvs_by_values([model["f_bl_i"]])
    return model.compile_fn(graph, inputs=model.value_vars, on_unused_input="ignore")(point)


def test_dose_level_tier_scales_f_bl_per_dose_level(data):
    model = build_model(load_model("reference_dl"), data)
    assert list(model.coords["dose_level"]) == ["1", "3", "4"]
    assert model["z_DL_f_bl"].shape.eval().tolist() == [3]
    z_dl, om_dl, eta, om = np.array([-1.0, 0.5, 2.0]), 0.3, np.array([0.2, -0.4, 1.0]), 0.5
    got = _individual_f_bl(
        model,
        {"z_DL_f_bl": z_dl, "omega_DL_f_bl": np.array(om_dl), "eta_f_bl": eta, "omega_f_bl": np.array(om)},
    )
    typical = np.exp(-3.912023)  # z_f_bl = 0: the prior's median, 0.02
    dl_of_subject = np.array([0, 1, 2])  # subjects 1, 2, 3 are at DL 1, 3, 4
    np.testing.assert_allclose(got, typical * np.exp(om_dl * z_dl[dl_of_subject] + om * eta), rtol=1e-12)


def test_dose_covariate_is_a_power_of_dose_over_its_median(data):
    model = build_model(load_model("reference_dose_cov"), data)
    beta = -0.7
    got = _individual_f_bl(model, {"beta_f_bl_DOSE": np.array(beta)})
    doses = np.array([d[0, 1] for d in data.doses])  # 0.75, 2, 3 (10^9 cells)
    np.testing.assert_allclose(doses, [0.75, 2.0, 3.0])
    np.testing.assert_allclose(got, 0.02 * (doses / 2.0) ** beta, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reference_dl", "reference_dose_cov"])
def test_variant_fits_and_compares_with_reference(small_fit, tmp_path, name):
    """A short fit of each variant on the example cohort, compared with the session's reference fit."""
    from carnk_pkpd.compare import compare_fits
    from carnk_pkpd.inference import fit

    f = fit(embedded_cohort_path("example"), name, draws=100, tune=100, chains=2, seed=5, progress=False)
    post = f.posterior
    if name == "reference_dl":
        assert post["f_bl_DL"].dims == ("chain", "draw", "dose_level")
    else:
        assert "beta_f_bl_DOSE" in post
    df = compare_fits([small_fit, f], names=["reference", name])
    assert set(df["model"]) == {"reference", name} and np.isfinite(df["elpd_loo"]).all()
    print(df[["model", "elpd_loo", "se", "elpd_diff", "dse", "k_bad", "k_very_bad"]].to_string())


def test_estimated_omegas_follow_the_file_prior(data):
    """omega_k_rej ~ LogNormal(log 0.4, 0.5) as the file says (4,000 prior draws: mean and SD of log
    omega within 4 Monte Carlo SEs), and HalfNormal(0.4) when the file gives no omega prior."""
    import pymc as pm

    spec = load_model("reference")
    draws = pm.draw(build_model(spec, data)["omega_k_rej"], draws=4000, random_seed=1)
    se = 0.5 / np.sqrt(4000)
    assert abs(np.log(draws).mean() - np.log(0.4)) < 4 * se
    assert abs(np.log(draws).std() - 0.5) < 4 * se / np.sqrt(2) * 1.5
    half = dataclasses.replace(spec.parameters["k_rej"], bsv_prior={"dist": "HalfNormal", "sigma": 0.4})
    spec_half = dataclasses.replace(spec, parameters={**spec.parameters, "k_rej": half})
    draws = pm.draw(build_model(spec_half, data)["omega_k_rej"], draws=4000, random_seed=1)
    mean, sd = 0.4 * np.sqrt(2 / np.pi), 0.4 * np.sqrt(1 - 2 / np.pi)
    assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(4000)
