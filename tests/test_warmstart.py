"""The warm start: posterior mode, a Hessian that uses the subjects' independence, and the whitening.

Each check compares against an independent reference: JAX's exact Hessian, the closed-form mode and
covariance of a Gaussian (where the Laplace approximation is exact), and the chain rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from carnk_pkpd.warmstart import (
    find_mode,
    laplace_whitening,
    sign_start,
    structured_hessian,
    whitened_model,
)

jax.config.update("jax_enable_x64", True)

N_SUB = 4
Y = np.array([0.3, -0.8, 1.4, 0.2])


def toy_logp(x):
    """Two population parameters (a, log b), then η1 of 4 subjects, then η2 of 4 subjects: each
    subject's likelihood term involves only its own η's and the population parameters."""
    a, log_b = x[0], x[1]
    eta1, eta2 = x[2 : 2 + N_SUB], x[2 + N_SUB :]
    pred = a + jnp.exp(log_b) * eta1 + 0.3 * eta1 * eta2 + 0.2 * jnp.sin(eta2)
    return -0.5 * (a**2 + log_b**2) - 0.5 * jnp.sum(eta1**2 + eta2**2) - 0.5 * jnp.sum((Y - pred) ** 2 / 0.25)


def logp_grad(fn):
    vg = jax.jit(jax.value_and_grad(fn))

    def call(x):
        v, g = vg(jnp.asarray(x))
        return float(v), np.asarray(g)

    return call


BLOCKS = [np.arange(2, 2 + N_SUB), np.arange(2 + N_SUB, 2 + 2 * N_SUB)]


def test_structured_hessian_equals_the_exact_hessian_with_few_gradients():
    x = np.random.default_rng(1).normal(size=2 + 2 * N_SUB) * 0.5
    H, used = structured_hessian(logp_grad(toy_logp), x, BLOCKS)
    exact = -np.asarray(jax.hessian(toy_logp)(jnp.asarray(x)))
    np.testing.assert_allclose(H, exact, rtol=1e-6, atol=1e-6)
    # 2 population columns + 2 η blocks, two gradients each: not 2 per coordinate (20)
    assert used == 2 * (2 + 2)


def test_gaussian_target_mode_and_whitening_are_its_mean_and_covariance():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(5, 5))
    cov = A @ A.T + 0.5 * np.eye(5)
    prec = np.linalg.inv(cov)
    mean = rng.normal(size=5)

    def gauss(x):
        r = x - mean
        return -0.5 * r @ prec @ r

    # no subject blocks: every coordinate is a population parameter (a dense Hessian)
    w = laplace_whitening(logp_grad(gauss), np.zeros(5), [])
    assert w is not None and w.converged
    np.testing.assert_allclose(w.mode, mean, atol=1e-5)
    np.testing.assert_allclose(w.L @ w.L.T, cov, rtol=1e-4, atol=1e-6)


def test_eigenvalue_floor_bounds_flat_directions():
    # a direction with curvature 0.001 (SD 31.6) gets the floor's SD 1/sqrt(0.1)
    def flat(x):
        return -0.5 * (x[0] ** 2 + 0.001 * x[1] ** 2)

    w = laplace_whitening(logp_grad(flat), np.array([0.5, 0.5]), [])
    sds = np.sqrt(np.diag(w.L @ w.L.T))
    np.testing.assert_allclose(sds, [1.0, 1.0 / np.sqrt(0.1)], rtol=1e-4)


def test_find_mode_of_a_shifted_quadratic():
    x, value, used, ok = find_mode(logp_grad(lambda x: -jnp.sum((x - 2.0) ** 2)), np.zeros(3))
    assert ok and used > 0
    np.testing.assert_allclose(x, 2.0, atol=1e-6)
    assert abs(value) < 1e-10


@dataclasses.dataclass(frozen=True)
class FakeCompiled:
    """The three nutpie hooks :func:`whitened_model` replaces."""

    _make_logp_func: object
    _make_expand_func: object
    _make_initial_points: object


def test_whitened_model_is_the_same_density_seen_through_x_equals_mode_plus_L_u():
    lg = logp_grad(toy_logp)
    compiled = FakeCompiled(
        _make_logp_func=lambda: lambda x, **_: lg(x),
        _make_expand_func=lambda a, b, c: lambda x, **_: {"x": np.array(x)},
        _make_initial_points=None,
    )
    w = laplace_whitening(lg, np.zeros(2 + 2 * N_SUB), BLOCKS)
    wm = whitened_model(compiled, w)
    u = np.random.default_rng(3).normal(size=w.mode.size)
    x = w.mode + w.L @ u
    value_u, grad_u = wm._make_logp_func()(u)
    value_x, grad_x = lg(x)
    assert value_u == value_x
    np.testing.assert_allclose(grad_u, w.L.T @ grad_x, rtol=1e-12)  # chain rule
    np.testing.assert_allclose(wm._make_expand_func(0, 0, 0)(u)["x"], x)
    start = wm._make_initial_points(5)
    np.testing.assert_array_equal(np.abs(start), 1.0)


def test_sign_start_is_seeded():
    a, b, c = sign_start(1, 50), sign_start(1, 50), sign_start(2, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a)) == {-1.0, 1.0}


def test_flat_layout_is_the_order_nutpie_compiles():
    """The warm start and the starting points address nutpie's flat vector by name. Its order is
    that of the model nutpie compiles (frozen dims), not ``model.free_RVs``: check it against nutpie's
    own log density and PyMC's at the same random point, on the reference model with its η's."""
    import nutpie

    from carnk_pkpd.data import embedded_cohort_path, read_cohort
    from carnk_pkpd.spec import load_model
    from carnk_pkpd.statistical import build_model, observation_data
    from carnk_pkpd.warmstart import flat_layout, flatten, subject_blocks

    data = observation_data(read_cohort(embedded_cohort_path("example")))
    model = build_model(load_model("reference"), data)
    rng = np.random.default_rng(3)
    point = {k: v + 0.3 * rng.standard_normal(np.shape(v)) for k, v in model.initial_point().items()}
    compiled = nutpie.compile_pymc_model(model, backend="jax", gradient_backend="jax")
    layout = flat_layout(model)
    nutpie_logp = compiled._make_logp_func()(flatten(point, layout), **dict(compiled._shared_data))[0]
    np.testing.assert_allclose(nutpie_logp, model.compile_logp()(point), rtol=1e-10)
    # the subject blocks are exactly the η's, each one index per subject
    etas = {n: sl for n, sl, _ in layout if n.startswith("eta_")}
    blocks = subject_blocks(model)
    assert len(blocks) == len(etas) and all(b.size == data.n_subjects for b in blocks)
    assert {(b[0], b[-1] + 1) for b in blocks} == {(sl.start, sl.stop) for sl in etas.values()}
