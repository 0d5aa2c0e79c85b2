"""Provenance of output files: a ``# SYNTHETIC ...`` first line when the fitted data are synthetic, the
package version and the fit's hash.

CSV files carry it as ``#`` comment lines before the header (read them with
``pandas.read_csv(path, comment="#")``); netCDF files as root attributes; JSON as keys. The fit hash
is the SHA-256 of the fit folder's ``manifest.json``, which itself holds the SHA-256 of every file of
the fit, so it identifies the fit exactly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["SYNTHETIC_LINE", "fit_hash", "lines_from_attrs", "provenance", "provenance_lines", "write_csv"]

SYNTHETIC_LINE = "SYNTHETIC data: simulated patients, not trial data"


def fit_hash(fit: Any) -> str | None:
    """SHA-256 of the fit folder's ``manifest.json`` (None for a fit that was never saved)."""
    path = getattr(fit, "path", None)
    if path is None:
        return None
    manifest = Path(path) / "manifest.json"
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    except OSError:
        return None


def provenance(
    fit: Any = None, *, synthetic: bool | None = None, command: str | None = None
) -> dict[str, Any]:
    """Provenance as a flat mapping (netCDF attributes, JSON keys): ``synthetic`` (0/1),
    ``carnk_pkpd_version``, ``fit`` (folder name), ``fit_sha256`` and ``command`` where known."""
    from carnk_pkpd import __version__

    syn = bool(synthetic if synthetic is not None else getattr(fit, "synthetic", False))
    out: dict[str, Any] = {"synthetic": int(syn), "carnk_pkpd_version": __version__}
    if syn:
        out["note"] = SYNTHETIC_LINE
    if command:
        out["command"] = f"carnk-pkpd {command}"
    if fit is not None and getattr(fit, "path", None) is not None:
        out["fit"] = str(fit.path)
        digest = fit_hash(fit)
        if digest:
            out["fit_sha256"] = digest
    return out


def provenance_lines(
    fit: Any = None, *, synthetic: bool | None = None, command: str | None = None
) -> list[str]:
    """Comment lines (without ``#``): ``SYNTHETIC ...`` first when synthetic, then version and fit hash."""
    return lines_from_attrs(provenance(fit, synthetic=synthetic, command=command))


def lines_from_attrs(attrs: Any) -> list[str]:
    """Comment lines from a :func:`provenance` mapping (e.g. a dataset's ``attrs``)."""
    from carnk_pkpd import __version__

    try:
        syn = bool(int(attrs.get("synthetic", 0)))
    except (TypeError, ValueError):
        syn = bool(attrs.get("synthetic"))
    lines = [SYNTHETIC_LINE] if syn else []
    text = f"written by carnk-pkpd {attrs.get('carnk_pkpd_version', __version__)}"
    if attrs.get("command"):
        text += f" ({attrs['command']})"
    if attrs.get("fit_sha256"):
        text += f"; fit {attrs.get('fit', '')} (manifest.json SHA-256 {attrs['fit_sha256']})"
    lines.append(text)
    return lines


def write_csv(df: Any, path: str | os.PathLike, lines: list[str], **to_csv: Any) -> Path:
    """Write ``df`` to ``path`` (not atomically: use inside a temporary folder) after ``# line`` comments."""
    path = Path(path)
    to_csv.setdefault("index", False)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for line in lines:
            fh.write(f"# {line}\n")
        df.to_csv(fh, **to_csv)
    return path
