"""Sampler diagnostics after every fit: R-hat, bulk/tail ESS, divergences, E-BFMI, tree depth."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import xarray as xr

RHAT_MAX = 1.01
ESS_MIN = 400
EBFMI_MIN = 0.3


@dataclass(frozen=True)
class Diagnostics:
    """Summary of a fit's convergence checks over its population-level quantities."""

    n_chains: int
    n_draws: int
    max_r_hat: float
    min_ess_bulk: float
    min_ess_tail: float
    divergences: int
    min_ebfmi: float
    max_tree_depth: int
    tree_depth_saturated: float  # fraction of draws at the maximum depth
    worst: dict[str, str] = field(default_factory=dict)  # which quantity was worst for each check
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def advice(self) -> list[str]:
        """What to try for each failed check, in plain words."""
        tips = []
        text = " ".join(self.problems)
        if "R-hat" in text or "ESS" in text:
            tips.append("run longer (--tune 2000 --draws 2000) or more chains; check for multimodality")
        if "divergent" in text:
            tips.append(
                "raise the target acceptance (--target-accept 0.95), tighten weakly identified priors, "
                "or fix a poorly identified BSV"
            )
        if "E-BFMI" in text:
            tips.append(
                "a heavy-tailed or funnel-shaped posterior: consider fixing omegas the data cannot inform"
            )
        if "tree depth" in text:
            tips.append(
                "strong posterior correlations: reparameterise or fix parameters the data do not inform"
            )
        return tips


def _ebfmi(energy: np.ndarray) -> np.ndarray:
    """E-BFMI per chain from the Hamiltonian energy (chain, draw)."""
    num = np.sum(np.diff(energy, axis=1) ** 2, axis=1) / energy.shape[1]
    den = np.var(energy, axis=1)
    return num / np.where(den > 0, den, np.nan)


def population_variables(posterior: xr.Dataset) -> list[str]:
    """Population-level quantities: variables with only chain/draw (and dose_level) dims, no raw z's."""
    out = []
    for name, da in posterior.data_vars.items():
        if name.startswith(("z_", "eta_")):
            continue
        if set(da.dims) - {"chain", "draw", "dose_level"}:
            continue
        out.append(name)
    return out


def diagnose(
    posterior: xr.Dataset, sample_stats: xr.Dataset | None, *, max_tree_depth: int = 10
) -> Diagnostics:
    """Check a posterior: R-hat ≤ 1.01, bulk and tail ESS ≥ 400, no divergences, E-BFMI ≥ 0.3,
    tree depth not saturated (< 1% of draws at the maximum)."""
    import arviz_stats as azs  # ArviZ 1.x statistics on NumPy arrays

    names = population_variables(posterior)
    rhat, ess_b, ess_t = {}, {}, {}
    for name in names:
        arr = posterior[name].transpose("chain", "draw", ...).values
        flat = arr.reshape(arr.shape[0], arr.shape[1], -1)
        for k in range(flat.shape[2]):
            key = name if flat.shape[2] == 1 else f"{name}[{k}]"
            x = flat[:, :, k]
            rhat[key] = float(azs.base.array_stats.rhat(x, chain_axis=0, draw_axis=1))
            ess_b[key] = float(azs.base.array_stats.ess(x, chain_axis=0, draw_axis=1, method="bulk"))
            ess_t[key] = float(
                azs.base.array_stats.ess(x, chain_axis=0, draw_axis=1, method="tail", prob=0.05)
            )
    n_chains, n_draws = posterior.sizes["chain"], posterior.sizes["draw"]
    div = 0
    ebfmi = np.array([np.nan])
    depth_max, sat = 0, 0.0
    if sample_stats is not None:
        if "diverging" in sample_stats:
            div = int(sample_stats["diverging"].sum())
        if "energy" in sample_stats:
            ebfmi = _ebfmi(sample_stats["energy"].transpose("chain", "draw").values)
        depth_var = (
            "depth" if "depth" in sample_stats else ("tree_depth" if "tree_depth" in sample_stats else None)
        )
        if depth_var:
            depth = sample_stats[depth_var].values
            depth_max = int(np.max(depth))
            sat = float(np.mean(depth >= max_tree_depth))
    worst = {}
    problems = []
    if rhat:
        k = max(rhat, key=lambda n: rhat[n] if np.isfinite(rhat[n]) else np.inf)
        worst["r_hat"] = k
        if not rhat[k] <= RHAT_MAX:
            problems.append(f"R-hat {rhat[k]:.3f} > {RHAT_MAX} for {k}")
        kb = min(ess_b, key=lambda n: ess_b[n] if np.isfinite(ess_b[n]) else -np.inf)
        kt = min(ess_t, key=lambda n: ess_t[n] if np.isfinite(ess_t[n]) else -np.inf)
        worst["ess_bulk"], worst["ess_tail"] = kb, kt
        if not ess_b[kb] >= ESS_MIN:
            problems.append(f"bulk ESS {ess_b[kb]:.0f} < {ESS_MIN} for {kb}")
        if not ess_t[kt] >= ESS_MIN:
            problems.append(f"tail ESS {ess_t[kt]:.0f} < {ESS_MIN} for {kt}")
    if div:
        problems.append(f"{div} divergent transitions")
    if np.nanmin(ebfmi) < EBFMI_MIN:
        problems.append(f"E-BFMI {np.nanmin(ebfmi):.2f} < {EBFMI_MIN}")
    if sat > 0.01:
        problems.append(f"tree depth saturated in {100 * sat:.1f}% of draws (max depth {max_tree_depth})")
    return Diagnostics(
        n_chains=n_chains,
        n_draws=n_draws,
        max_r_hat=max(rhat.values()) if rhat else float("nan"),
        min_ess_bulk=min(ess_b.values()) if ess_b else float("nan"),
        min_ess_tail=min(ess_t.values()) if ess_t else float("nan"),
        divergences=div,
        min_ebfmi=float(np.nanmin(ebfmi)) if np.any(np.isfinite(ebfmi)) else float("nan"),
        max_tree_depth=depth_max,
        tree_depth_saturated=sat,
        worst=worst,
        problems=problems,
    )


def render_diagnostics(diag: Diagnostics, console=None) -> None:
    """Print the diagnostics as a rich table, with advice when a check fails."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="Sampler diagnostics (population-level quantities)")
    for col in ("check", "value", "target", "status"):
        t.add_column(col)

    def row(name, value, target, ok):
        t.add_row(name, value, target, "[green]ok[/green]" if ok else "[red]FAIL[/red]")

    row("max R-hat", f"{diag.max_r_hat:.3f}", f"≤ {RHAT_MAX}", diag.max_r_hat <= RHAT_MAX)
    row("min bulk ESS", f"{diag.min_ess_bulk:.0f}", f"≥ {ESS_MIN}", diag.min_ess_bulk >= ESS_MIN)
    row("min tail ESS", f"{diag.min_ess_tail:.0f}", f"≥ {ESS_MIN}", diag.min_ess_tail >= ESS_MIN)
    row("divergences", str(diag.divergences), "0", diag.divergences == 0)
    row("min E-BFMI", f"{diag.min_ebfmi:.2f}", f"≥ {EBFMI_MIN}", not diag.min_ebfmi < EBFMI_MIN)
    row(
        "tree depth saturated",
        f"{100 * diag.tree_depth_saturated:.1f}%",
        "< 1%",
        diag.tree_depth_saturated <= 0.01,
    )
    console.print(t)
    if diag.ok:
        console.print("[green]All diagnostics pass.[/green]")
    else:
        console.print("[red]This fit fails its diagnostics:[/red] " + "; ".join(diag.problems))
        for tip in diag.advice():
            console.print(f"  try: {tip}")
