"""Pointwise log-likelihood group of a saved fit: it is the fitted likelihood, record by record."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from carnk_pkpd.loglik import joint_log_likelihood, pointwise_log_likelihood
from carnk_pkpd.statistical import observation_data

DRAWS = [(0, 0), (1, 37)]  # (chain, draw) positions checked by hand


def _transformed_point(model, post: xr.Dataset, chain: int, draw: int) -> dict[str, np.ndarray]:
    """The sampler's (unconstrained) point for one posterior draw."""
    import pytensor.tensor as pt

    point = {}
    for rv in model.free_RVs:
        x = post[rv.name].isel(chain=chain, draw=draw).values
        tr = model.rvs_to_transforms.get(rv)
        if tr is not None:
            x = tr.forward(pt.as_tensor(x), *rv.owner.inputs).eval()
        point[model.rvs_to_values[rv].name] = np.asarray(x, dtype=float)
    return point


def test_saved_fit_has_one_log_likelihood_variable_per_observation_type(small_fit):
    ll = small_fit.idata["log_likelihood"].to_dataset()
    rec = small_fit.idata["constant_data"].to_dataset()
    assert set(ll.data_vars) == {"car_flow", "bcell_flow"}  # the example cohort has no qPCR
    seen = []
    for name, dvid in (("car_flow", 1), ("bcell_flow", 2)):
        da = ll[name]
        assert da.dims == ("chain", "draw", f"{name}_record")
        assert da.sizes["chain"] == 2 and da.sizes["draw"] == 60
        idx = da[f"{name}_record"].values
        np.testing.assert_array_equal(rec["DVID"].values[idx], dvid)
        assert np.all(np.isfinite(da.values))
        seen.append(idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), rec["record"].values)  # every record once
    obs = small_fit.idata["observed_data"].to_dataset()
    np.testing.assert_array_equal(obs["car_flow"].values, rec["DV"].values[seen[0]])


@pytest.mark.filterwarnings("ignore:Numba will use object mode")
@pytest.mark.parametrize(("chain", "draw"), DRAWS)
def test_sum_over_records_is_model_logp_minus_prior(small_fit, chain, draw):
    """Σ pointwise log-lik at a draw = the PyMC model's logp − the priors' logp (no Jacobian)."""
    from carnk_pkpd.statistical import build_model

    model = build_model(small_fit.spec, observation_data(small_fit.cohort))
    point = _transformed_point(model, small_fit.posterior, chain, draw)
    lik = model.logp(jacobian=False) - model.logp(vars=model.free_RVs, jacobian=False)
    expected = float(model.compile_fn(lik, on_unused_input="ignore")(point))
    got = float(joint_log_likelihood(small_fit.idata).isel(chain=chain, draw=draw).sum())
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(("chain", "draw"), DRAWS)
def test_records_match_scipy_with_m3_for_blq(small_fit, chain, draw):
    """Per record: log-normal / combined-error density or, for BLQ records, log P(Y < LLOQ) (norm.logcdf),
    from an independent tight solve of each subject at the draw's individual parameters."""
    from carnk_pkpd.structural import simulate

    fit = small_fit
    data = observation_data(fit.cohort)
    ind = fit.individual_parameters().isel(chain=chain, draw=draw)
    post = fit.posterior.isel(chain=chain, draw=draw)
    car = np.empty(len(data.dv))
    b = np.empty(len(data.dv))
    for s in range(data.n_subjects):
        params = {k: float(ind[k].values[s]) for k in ind.data_vars}
        sim = simulate(params, [tuple(d) for d in data.doses[s]], data.times[s], fit.spec, accuracy="tight")
        rows = data.subject_index == s
        car[rows] = sim["car"].values[data.time_index[rows]]
        b[rows] = sim["bcell"].values[data.time_index[rows]]
    y, blq, lloq = data.dv, data.blq == 1, data.lloq
    s_car = float(post["sigma_car_flow"])
    prop = float(post["sigma_bcell_flow_prop"])
    add = fit.spec.observations[2].residual["add"].typical  # fixed in the reference model
    sd_b = np.hypot(prop * b, add)
    mu_car = np.log(car + 1e-9)
    expected = np.where(
        data.dvid == 1,
        np.where(
            blq,
            stats.norm.logcdf((np.log(lloq) - mu_car) / s_car),
            stats.norm.logpdf(np.log(y), mu_car, s_car) - np.log(y),
        ),
        np.where(blq, stats.norm.logcdf((lloq - b) / sd_b), stats.norm.logpdf(y, b, sd_b)),
    )
    got = joint_log_likelihood(fit.idata).isel(chain=chain, draw=draw).values
    assert blq[data.dvid == 1].any() and blq[data.dvid == 2].any()  # both M3 branches are checked
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=5e-5)  # solver tolerances


def test_arviz_loo_runs_per_type_and_jointly(small_fit):
    import warnings

    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto-k warnings: 120 draws of a short fit
        per = {v: az.loo(small_fit.idata, var_name=v) for v in ("car_flow", "bcell_flow")}
        joint_tree = xr.DataTree.from_dict(
            {
                "/posterior": small_fit.posterior,
                "/log_likelihood": joint_log_likelihood(small_fit.idata).to_dataset(name="DV"),
            }
        )
        joint = az.loo(joint_tree)
    for v, res in per.items():
        assert res.n_data_points == small_fit.idata["log_likelihood"][v].shape[-1]
        assert np.isfinite(res.elpd)
    # PSIS-LOO is computed record by record (same r_eff), so the joint elpd is the sum of the parts
    assert joint.elpd == pytest.approx(sum(r.elpd for r in per.values()), rel=1e-10)
    assert joint.n_data_points == small_fit.idata["constant_data"].sizes["record"]


def test_missing_free_variable_is_an_error(small_fit):
    post = small_fit.posterior.drop_vars("z_omega_f_bl")  # omega_f_bl = exp(mu + sigma·z): z is sampled
    with pytest.raises(ValueError, match="z_omega_f_bl"):
        pointwise_log_likelihood(small_fit.spec, observation_data(small_fit.cohort), post)


def test_fit_without_the_group_is_reported(small_fit):
    tree = small_fit.idata.copy()
    del tree["log_likelihood"]
    with pytest.raises(ValueError, match="no log_likelihood group"):
        joint_log_likelihood(tree)


def test_non_finite_values_warn_instead_of_losing_the_fit(small_fit):
    post = small_fit.posterior.isel(chain=[0], draw=[0, 1])
    post["z_sigma_car_flow"] = post["z_sigma_car_flow"] * 0 - 1e4  # residual SD exp(-3000) = 0
    with pytest.warns(UserWarning, match="non-finite pointwise log-likelihood"):
        ll = pointwise_log_likelihood(small_fit.spec, observation_data(small_fit.cohort), post)
    assert not np.all(np.isfinite(ll["car_flow"].values))
    assert np.all(np.isfinite(ll["bcell_flow"].values))
