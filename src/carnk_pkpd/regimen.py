"""A CAR-NK regimen: dose per infusion, interval and number of infusions (plus lymphodepletion scale).

Shared by remission prediction (:mod:`carnk_pkpd.remission`) and dose selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Regimen"]


@dataclass(frozen=True)
class Regimen:
    """``n_infusions`` infusions of ``dose`` (10⁹ CAR-NK cells each), ``interval`` days apart, the first
    at day 0; ``ld_scale`` multiplies the lymphodepletion kill rate ``k_LD0`` (1 = standard Cy/Flu)."""

    dose: float
    interval: float
    n_infusions: int = 3
    ld_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dose) and self.dose > 0):
            raise ValueError(f"dose must be > 0 (10⁹ cells per infusion; found {self.dose})")
        if not (math.isfinite(self.interval) and self.interval >= 0):
            raise ValueError(f"interval must be >= 0 days (found {self.interval})")
        if int(self.n_infusions) != self.n_infusions or self.n_infusions < 1:
            raise ValueError(f"n_infusions must be a whole number >= 1 (found {self.n_infusions})")
        if not (math.isfinite(self.ld_scale) and self.ld_scale >= 0):
            raise ValueError(f"ld_scale must be >= 0 (found {self.ld_scale})")

    def doses(self) -> list[tuple[float, float]]:
        """``[(day, 10⁹ cells), ...]`` of the infusions."""
        return [(float(i * self.interval), float(self.dose)) for i in range(int(self.n_infusions))]

    @property
    def total_dose(self) -> float:
        """Cells over all infusions (10⁹)."""
        return float(self.dose * self.n_infusions)

    def label(self) -> str:
        """Short text, e.g. ``3 x 2×10⁹ cells every 3 d``."""
        ld = "" if self.ld_scale == 1.0 else f", LD x{self.ld_scale:g}"
        return f"{int(self.n_infusions)} x {self.dose:g}×10⁹ cells every {self.interval:g} d{ld}"

    def as_dict(self) -> dict[str, Any]:
        """Plain mapping (for CSV columns and attrs)."""
        return {
            "dose": float(self.dose),
            "interval": float(self.interval),
            "n_infusions": int(self.n_infusions),
            "ld_scale": float(self.ld_scale),
        }

    @classmethod
    def from_dose_level(cls, dl: Any, ld_scale: float = 1.0) -> Regimen:
        """From a :class:`~carnk_pkpd.spec.DoseLevelSpec` (``dose``, ``interval``, ``n_infusions``)."""
        return cls(float(dl.dose), float(dl.interval), int(dl.n_infusions), ld_scale)
