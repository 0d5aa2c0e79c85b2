"""A fitted model and its folder: save atomically, load without refitting.

``fits/NAME/`` holds::

    posterior.nc    the ArviZ DataTree (posterior, sample_stats, observed_data, ...) as netCDF
    model.toml      a copy of the model file
    data.csv        a copy of the cohort (the reader's format), so predictions need nothing else
    summary.csv     one row per population-level quantity
    manifest.json   hashes of data and model, versions, seed, sampler settings, timings, diagnostics

Writing goes to a temporary sibling folder that is renamed into place at the end, so an interrupted
fit leaves ``fits/`` as it was, and an earlier fit of the same name survives unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from carnk_pkpd.errors import FitError

FORMAT_VERSION = 1
FILES = ("posterior.nc", "model.toml", "data.csv", "summary.csv", "manifest.json")
SUMMARY_COLUMNS = ["name", "unit", "mean", "sd", "q05", "q50", "q95", "ess_bulk", "ess_tail", "r_hat"]


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Fit:
    """A fitted population model.

    ``idata`` is an xarray DataTree with ArviZ groups (``posterior`` with dims ``chain, draw`` and
    ``subject``/``dose_level`` where relevant, ``sample_stats``, ``observed_data``).
    """

    spec: Any
    cohort: Any
    idata: xr.DataTree
    diagnostics: Any = None
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.idata is not None and "posterior" in self.idata.children:
            for msg in self.conversion_warnings():
                warnings.warn(msg, UserWarning, stacklevel=3)

    # -- views ---------------------------------------------------------------------------------------
    @property
    def posterior(self) -> xr.Dataset:
        return self.idata["posterior"].to_dataset()

    @property
    def synthetic(self) -> bool:
        return bool(getattr(self.cohort, "synthetic", False))

    @property
    def n_transit(self) -> int:
        return int(round(self.spec.parameters["n_transit"].typical))

    def population_parameters(self) -> xr.Dataset:
        """Typical value of every structural parameter (natural units) on ``chain, draw``.

        Fixed parameters are filled with the file's value so the result is complete.
        """
        post = self.posterior
        out = {}
        for name, par in self.spec.parameters.items():
            if name == "n_transit":
                continue
            if name in post:
                out[name] = post[name]
            else:
                out[name] = xr.full_like(post["draw"] * 0.0 + post["chain"] * 0.0, float(par.typical))
            out[name].attrs["units"] = par.unit
        return xr.Dataset(out).transpose("chain", "draw")

    def individual_parameters(self) -> xr.Dataset:
        """Each observed subject's structural parameters on ``chain, draw, subject`` (natural units).

        Computed by the population layer (:func:`carnk_pkpd.population.individual_parameters`) from
        each draw's typical (or dose-level) values, covariate effects and the subjects' fitted η, so
        parameters with fixed ω (OMEGA FIX) or covariate effects carry them too.
        """
        from carnk_pkpd.population import PopulationDraws, SubjectDesign, individual_parameters

        post = self.posterior
        n_chain, n_draw = post.sizes["chain"], post.sizes["draw"]
        pop = PopulationDraws.from_fit(self)
        design = SubjectDesign.from_cohort(self.cohort, self.spec)
        theta = individual_parameters(pop, design, new_subjects=False)
        subjects = list(design.ids)
        out = {}
        for name, v in theta.items():
            out[name] = xr.DataArray(
                v.reshape(n_chain, n_draw, -1),
                dims=("chain", "draw", "subject"),
                coords={"chain": post["chain"].values, "draw": post["draw"].values, "subject": subjects},
                attrs={"units": self.spec.parameters[name].unit},
            )
        ds = xr.Dataset(out)
        ds = ds.assign_coords(dose_level=("subject", list(design.dose_levels)))
        ds.attrs["n_transit"] = self.n_transit
        return ds

    def new_patients(
        self,
        n_patients: int,
        seed: int | np.random.Generator,
        n_draws: int | None = None,
        regimen: Any = None,
    ) -> xr.Dataset:
        """Parameters of new virtual patients on ``sample, patient`` (natural units).

        A thin view of :func:`carnk_pkpd.population.individual_parameters`: each of ``n_draws``
        posterior draws (all when None; chosen without replacement with ``seed``) gives ``n_patients``
        new patients with fresh η from Ω (estimated or fixed), covariate effects and, for a regimen
        that is not a fitted dose level, a new dose-level deviation. ``regimen`` (a
        :class:`~carnk_pkpd.regimen.Regimen`) sets the dose a ``DOSE`` covariate follows; None is a
        new dose level without infusions (then the model may not have a ``DOSE`` effect).
        """
        from carnk_pkpd.population import PopulationDraws, SubjectDesign, individual_parameters

        rng = np.random.default_rng(seed)
        pop = PopulationDraws.from_fit(self, n_draws, rng)
        if regimen is not None:
            design = SubjectDesign.from_regimen(self.spec, regimen, n_patients)
        else:
            nominal = [float(x) for x in self.spec.simulation["ld_days"]] or [-5.0, -3.0]
            design = SubjectDesign(
                ids=tuple(str(i) for i in range(n_patients)),
                doses=tuple(np.zeros((0, 2)) for _ in range(n_patients)),
                dose_levels=tuple("new" for _ in range(n_patients)),
                covariates={},
                ld_start=np.full(n_patients, min(nominal)),
                ld_end=np.full(n_patients, max(nominal)),
                ld_scale=np.ones(n_patients),
            )
        theta = individual_parameters(pop, design, rng)
        out = {
            name: (("sample", "patient"), v, {"units": self.spec.parameters[name].unit})
            for name, v in theta.items()
        }
        ds = xr.Dataset(out, coords={"sample": np.arange(pop.n_draws), "patient": np.arange(n_patients)})
        ds.attrs["n_transit"] = self.n_transit
        return ds

    def conversion_warnings(self, ratio: float = 0.8) -> list[str]:
        """Warnings for a qPCR conversion factor (copies/µg per cell/µL) that the data do not inform.

        f_bl and ``copies_per_cell`` enter DVID 3 predictions only as a product, so qPCR data identify
        the product while each factor stays where its prior put it. Warns when the factor's posterior
        SD on the log scale is more than ``ratio`` times its prior's and f_bl's is too (the product
        identified, the factors not). Empty when the fit has no estimated factor.
        """
        post = self.posterior
        msgs = []
        for obs in self.spec.observations.values():
            conv = obs.conversion
            if conv is None or conv.name not in post or "f_bl" not in post:
                continue
            prior_conv = float((conv.prior or {}).get("sigma", np.nan))
            prior_fbl = float((self.spec.parameters["f_bl"].prior or {}).get("sigma", np.nan))
            lc = np.log(post[conv.name].values).ravel()
            lf = np.log(post["f_bl"].values).ravel()
            sd_conv, sd_fbl, sd_prod = float(np.std(lc)), float(np.std(lf)), float(np.std(lc + lf))
            if not (np.isfinite(prior_conv) and np.isfinite(prior_fbl)):
                continue
            prior_prod = float(np.hypot(prior_conv, prior_fbl))
            if sd_conv / prior_conv > ratio and sd_prod / prior_prod < 0.5:
                msgs.append(
                    f"{conv.name} (DVID {obs.dvid}): posterior log-SD {sd_conv:.2f} is {sd_conv / prior_conv:.0%} "
                    f"of its prior's ({prior_conv:.2f}) (f_bl's: {sd_fbl / prior_fbl:.0%} of its prior's), "
                    f"while their product is identified (log-SD {sd_prod:.2f}): qPCR data inform "
                    f"f_bl·{conv.name} only. Fix the factor from an assay calibration, or give it an "
                    "informative prior with its source, before reading f_bl."
                )
        return msgs

    def summary(self) -> pd.DataFrame:
        """One row per population-level quantity (columns of ``summary.csv``)."""
        return summarise(self.posterior, self.spec)


# -- summary -------------------------------------------------------------------------------------------
def _unit_of(name: str, spec: Any) -> str:
    base = name.split("[")[0]
    if base in spec.parameters:
        return spec.parameters[base].unit
    if base.endswith("_DL") and base[:-3] in spec.parameters:
        return spec.parameters[base[:-3]].unit
    if base.startswith(("omega_", "omega_DL_")):
        return "log-scale SD"
    if base.startswith("sigma_"):
        for obs in spec.observations.values():
            if base == f"sigma_{obs.name}":
                return "log-scale SD"
            if base == f"sigma_{obs.name}_prop":
                return "fraction"
            if base == f"sigma_{obs.name}_add":
                return obs.unit
    if base == "copies_per_cell":
        return "copies/µg per cells/µL"
    if base.startswith("beta_"):
        return "1"
    return ""


def summarise(posterior: xr.Dataset, spec: Any) -> pd.DataFrame:
    """Posterior summary of population-level quantities with ESS and R-hat (ArviZ-stats)."""
    import arviz_stats as azs

    from carnk_pkpd.diagnostics import population_variables

    rows = []
    for name in population_variables(posterior):
        da = posterior[name].transpose("chain", "draw", ...)
        arr = da.values.reshape(da.sizes["chain"], da.sizes["draw"], -1)
        labels = [name]
        if arr.shape[2] > 1:
            extra = [d for d in da.dims if d not in ("chain", "draw")]
            labels = [f"{name}[{v}]" for v in da[extra[0]].values]
        for k, label in enumerate(labels):
            x = arr[:, :, k]
            rows.append(
                dict(
                    name=label,
                    unit=_unit_of(label, spec),
                    mean=float(np.mean(x)),
                    sd=float(np.std(x, ddof=1)),
                    q05=float(np.quantile(x, 0.05)),
                    q50=float(np.quantile(x, 0.5)),
                    q95=float(np.quantile(x, 0.95)),
                    ess_bulk=float(azs.base.array_stats.ess(x, chain_axis=0, draw_axis=1, method="bulk")),
                    ess_tail=float(
                        azs.base.array_stats.ess(x, chain_axis=0, draw_axis=1, method="tail", prob=0.05)
                    ),
                    r_hat=float(azs.base.array_stats.rhat(x, chain_axis=0, draw_axis=1)),
                )
            )
    order = {n: i for i, n in enumerate(spec.parameters)}

    def key(r):
        n = r["name"]
        base = n.split("[")[0]
        for prefix, rank in (("omega_DL_", 2), ("omega_", 1), ("sigma_", 3), ("beta_", 4)):
            if base.startswith(prefix):
                return (rank, order.get(base[len(prefix) :], 99), n)
        return (0, order.get(base.removesuffix("_DL"), 99), n)

    rows.sort(key=key)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# -- save / load ---------------------------------------------------------------------------------------
def output_path(fit: Any, out: str | os.PathLike | None, default: str, what: str = "folder") -> Path:
    """``out``, or ``<fit folder>/<default>`` when ``out`` is None (the default place of a command's
    output); a fit that was never saved has no folder, so ``out`` is then required."""
    if out is not None:
        return Path(out)
    if getattr(fit, "path", None) is None:
        raise ValueError(f"the fit has no folder; give an output {what}")
    return Path(fit.path) / default


def save_fit(fit: Fit, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``fit`` to the folder ``path`` atomically (temporary sibling folder, then rename)."""
    from carnk_pkpd.atomic import atomic_folder
    from carnk_pkpd.data import write_cohort
    from carnk_pkpd.provenance import provenance_lines, write_csv

    dest = Path(path)
    with atomic_folder(dest, overwrite=overwrite, kind="fit", command="fit") as tmp:
        (tmp / "model.toml").write_text(fit.spec.text, encoding="utf-8")
        write_cohort(fit.cohort, tmp / "data.csv")
        idata = fit.idata.copy()  # root attributes carry the provenance (SYNTHETIC, version, data hash)
        idata.attrs = {**dict(fit.idata.attrs), **_root_attrs(fit)}
        idata.to_netcdf(tmp / "posterior.nc", engine="netcdf4")
        write_csv(
            fit.summary(), tmp / "summary.csv", provenance_lines(synthetic=fit.synthetic, command="fit")
        )
        manifest = dict(fit.manifest)
        manifest.update(
            format_version=FORMAT_VERSION,
            files={name: sha256(tmp / name) for name in FILES if name != "manifest.json"},
            diagnostics=fit.diagnostics.to_dict() if fit.diagnostics is not None else None,
            synthetic=fit.synthetic,
        )
        (tmp / "manifest.json").write_text(
            json.dumps(manifest, indent=2, default=_json_default), encoding="utf-8"
        )
    fit.path = dest
    fit.manifest = manifest
    return dest


def _root_attrs(fit: Fit) -> dict[str, Any]:
    """Provenance for the root group of ``posterior.nc``."""
    from carnk_pkpd.provenance import provenance

    out = provenance(synthetic=fit.synthetic, command="fit")
    for key in ("data_sha256", "model_sha256", "model_name", "created", "seed"):
        value = fit.manifest.get(key)
        if value is not None:
            out[key] = value
    return out


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_fit(path: str | os.PathLike) -> Fit:
    """Restore a saved fit (posterior, model, data, manifest) without refitting.

    Raises :class:`~carnk_pkpd.errors.FitError` naming the file when the folder is incomplete,
    damaged (a hash differs from the manifest) or written by an incompatible format version.
    """
    from carnk_pkpd.data import read_cohort
    from carnk_pkpd.diagnostics import Diagnostics
    from carnk_pkpd.errors import DataError, ModelFileError
    from carnk_pkpd.spec import load_model

    folder = Path(path)
    if not folder.is_dir():
        raise FitError(f"{folder}: not a fit folder (expected a directory written by 'carnk-pkpd fit')")
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FitError(f"{mpath}: missing; this folder is not a complete fit") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FitError(f"{mpath}: damaged ({e})") from None
    except OSError as e:
        raise FitError(f"{mpath}: cannot be read ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise FitError(f"{mpath}: damaged (expected a JSON object, found {type(manifest).__name__})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FitError(
            f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}); refit with this version of carnk_pkpd"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise FitError(f"{mpath}: key 'files': damaged (expected a mapping of file name to SHA-256)")
    for name in FILES:
        if name != "manifest.json" and name not in files:
            raise FitError(f"{mpath}: key 'files': {name} is not listed; this folder is not a complete fit")
    for name, digest in files.items():
        f = folder / name
        if Path(name).name != name:
            raise FitError(f"{mpath}: key 'files': {name!r} is not a file name in the fit folder")
        if not f.is_file():
            raise FitError(f"{f}: missing from the fit folder")
        try:
            actual = sha256(f)
        except OSError as e:
            raise FitError(f"{f}: cannot be read ({e.strerror or e})") from None
        if actual != digest:
            raise FitError(f"{f}: damaged (its SHA-256 differs from manifest.json)")
    try:
        spec = load_model(folder / "model.toml")
    except ModelFileError as e:
        raise FitError(f"{folder / 'model.toml'}: {e}") from None
    try:
        cohort = read_cohort(folder / "data.csv")
    except DataError as e:
        raise FitError(f"{folder / 'data.csv'}: {e}") from None
    try:
        # load into memory and close at once: an HDF5 handle left open can be confused with a new file
        # that later reuses the inode (a copied or replaced fit folder), which crashes the library
        with xr.open_datatree(folder / "posterior.nc", engine="netcdf4") as tree:
            idata = tree.load()
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file
        raise FitError(f"{folder / 'posterior.nc'}: cannot be read ({e})") from None
    diag = manifest.get("diagnostics")
    diagnostics = None
    if diag:
        try:
            diag = {k: v for k, v in diag.items() if k != "ok"}
            diagnostics = Diagnostics(**diag)
        except (AttributeError, TypeError, ValueError) as e:
            raise FitError(f"{mpath}: key 'diagnostics': damaged ({e})") from None
    _check_posterior(idata, spec, cohort, folder)
    return Fit(spec=spec, cohort=cohort, idata=idata, diagnostics=diagnostics, manifest=manifest, path=folder)


def _check_posterior(idata: Any, spec: Any, cohort: Any, folder: Path) -> None:
    """The posterior must match the model and data of the folder (names the file and the variable)."""
    where = folder / "posterior.nc"
    if "posterior" not in getattr(idata, "children", {}):
        raise FitError(f"{where}: no 'posterior' group; this is not a posterior written by 'carnk-pkpd fit'")
    post = idata["posterior"]
    for dim in ("chain", "draw"):
        if dim not in post.dims or post.sizes[dim] < 1:
            raise FitError(f"{where}: group 'posterior' has no {dim!r} dimension")
    for name in spec.free_parameters():
        if name == "n_transit":
            continue
        if name not in post.data_vars:
            raise FitError(
                f"{where}: variable {name!r} (estimated in model.toml) is missing; the posterior and "
                "model.toml do not belong together"
            )
    if "subject" in post.dims and post.sizes["subject"] != len(cohort.subjects):
        raise FitError(
            f"{where}: {post.sizes['subject']} subjects in the posterior but {len(cohort.subjects)} in "
            "data.csv; the posterior and data.csv do not belong together"
        )
