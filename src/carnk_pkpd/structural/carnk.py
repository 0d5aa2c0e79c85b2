"""CAR-NK kinetics in blood (closed form) and the lymphodepletion kill rate.

Reference structure (science.md §4): each infusion adds ``f_bl·D/V_bl`` cells/µL and between
infusions ``dN/dt = [ρ·e^(−k_h t) − α − k_rej·(1 − e^(−k_rec (t+3)))]·N``, so by superposition::

    N(t) = Σ_{t_j ≤ t} (f_bl·D_j/V_bl)·exp(G(t) − G(t_j))
    G(t) = (ρ/k_h)(1 − e^(−k_h t)) − α t − k_rej·[t + e^(−k_rec (t+3))/k_rec]

``N`` is right-continuous: a sample at exactly an infusion time includes that infusion.
Time in days (t = 0 the first infusion), doses in 10⁹ cells, ``V_bl`` in µL, N in cells/µL.

Stein structure (Stein et al. 2019 CPT:PSP, adapted to repeated infusions): each infusion's cells
expand at ``rho`` until ``t_j + T_exp`` (days), then an effector part contracts at ``alpha`` while a
fraction ``F_mem`` converts into persisting cells lost at ``beta``; closed form per infusion, summed.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

DOSE_UNIT = 1e9  # cells per 10⁹ cells


def growth_exponent(th: Mapping[str, jnp.ndarray], t: jnp.ndarray) -> jnp.ndarray:
    """G(t) of the reference structure (dimensionless); parameters broadcast against ``t``."""
    rho, k_h, alpha = th["rho"], th["k_h"], th["alpha"]
    k_rej, k_rec = th["k_rej"], th["k_rec"]
    return (
        (rho / k_h) * (-jnp.expm1(-k_h * t)) - alpha * t - k_rej * (t + jnp.exp(-k_rec * (t + 3.0)) / k_rec)
    )


def _stein_unit(th: Mapping[str, jnp.ndarray], u: jnp.ndarray) -> jnp.ndarray:
    """Cells/µL per cell/µL infused, ``u`` days after an infusion (u ≥ 0), Stein structure."""
    rho, t_exp, alpha = th["rho"], th["T_exp"], th["alpha"]
    beta, f_mem = th["beta"], th["F_mem"]
    up = jnp.minimum(u, t_exp)
    down = jnp.maximum(u - t_exp, 0.0)
    peak = jnp.exp(rho * up)
    # after the peak: effector E decays at alpha, memory M gains k·E (k = F_mem·(alpha − beta)) and
    # decays at beta, so E + M = peak·[(1 − F_mem)·e^(−α·s) + F_mem·e^(−β·s)]
    return peak * ((1.0 - f_mem) * jnp.exp(-alpha * down) + f_mem * jnp.exp(-beta * down))


def car_closed_form(
    th: Mapping[str, jnp.ndarray],
    dose_times: jnp.ndarray,
    dose_amounts: jnp.ndarray,
    t: jnp.ndarray,
    structure: str = "reference",
) -> jnp.ndarray:
    """CAR-NK cells/µL at times ``t`` (days), shape ``(subject, n_t)``.

    ``th`` values have shape ``(subject,)``; ``dose_times``/``dose_amounts`` ``(subject, n_dose)``
    in days and 10⁹ cells (amount 0 pads); ``t`` ``(subject, n_t)``.
    """
    t = jnp.asarray(t)
    tj = jnp.asarray(dose_times)[:, None, :]  # [S, 1, J]
    amt = jnp.asarray(dose_amounts)[:, None, :]
    tt = t[:, :, None]  # [S, T, 1]
    p = {k: jnp.asarray(v)[:, None, None] for k, v in th.items() if jnp.ndim(v) == 1}
    given = tt >= tj
    if structure == "stein":
        u = jnp.where(given, tt - tj, 0.0)
        contrib = _stein_unit(p, u)
    else:
        d = growth_exponent(p, tt) - growth_exponent(p, tj)
        contrib = jnp.exp(jnp.where(given, d, -jnp.inf))
    n0 = p["f_bl"] * amt * DOSE_UNIT / p["V_bl"]
    return jnp.sum(jnp.where(given, n0 * contrib, 0.0), axis=-1)


def ld_rate(th: Mapping[str, jnp.ndarray], t: jnp.ndarray) -> jnp.ndarray:
    """Lymphodepletion kill rate k_LD(t) (1/day): k_LD0 on [−5, −3], then k_LD0·e^(−k_LDd(t+3))."""
    k0, kd = _bcast(th["k_LD0"], t), _bcast(th["k_LDd"], t)
    during = (t >= -5.0) & (t <= -3.0)
    after = jnp.exp(-kd * jnp.maximum(t + 3.0, 0.0))
    return jnp.where(t < -5.0, 0.0, jnp.where(during, k0, k0 * after))


def ld_cumulative(th: Mapping[str, jnp.ndarray], t: jnp.ndarray) -> jnp.ndarray:
    """∫_{−∞}^{t} k_LD (dimensionless), closed form; ``t`` of shape ``(subject,)`` or ``(subject, n)``."""
    k0, kd = _bcast(th["k_LD0"], t), _bcast(th["k_LDd"], t)
    during = jnp.clip(t, -5.0, -3.0) + 5.0
    after = jnp.maximum(t + 3.0, 0.0)
    return k0 * during + (k0 / kd) * (-jnp.expm1(-kd * after))


def _bcast(v, t):
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (jnp.ndim(t) - jnp.ndim(v)))
