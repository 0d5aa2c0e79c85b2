"""A dosing regimen of CAR-NK cells: dose per infusion, interval, number of infusions, lymphodepletion.

Shared by the remission prediction (:mod:`carnk_pkpd.remission`) and the dose search
(:mod:`carnk_pkpd.doses`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Regimen:
    """``dose`` 10⁹ CAR-NK cells per infusion, ``interval`` days between infusions, ``n_infusions``,
    and ``ld_scale`` multiplying the lymphodepletion kill rate ``k_LD0`` (1 = as in the trial,
    0 = no lymphodepletion)."""

    dose: float
    interval: float
    n_infusions: int
    ld_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dose", "interval", "n_infusions", "ld_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    object.__setattr__(self, name, float(value))
                except (TypeError, ValueError):
                    raise ValueError(f"{name} must be a number, found {value!r}") from None
        if not (math.isfinite(self.dose) and self.dose >= 0):
            raise ValueError(f"dose must be a finite number >= 0 (10⁹ cells), found {self.dose!r}")
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"interval must be a finite number > 0 (days), found {self.interval!r}")
        if int(self.n_infusions) != self.n_infusions or self.n_infusions < 1:
            raise ValueError(f"n_infusions must be an integer >= 1, found {self.n_infusions!r}")
        if not (math.isfinite(self.ld_scale) and self.ld_scale >= 0):
            raise ValueError(f"ld_scale must be a finite number >= 0, found {self.ld_scale!r}")
        object.__setattr__(self, "n_infusions", int(self.n_infusions))

    def doses(self, start: float = 0.0) -> list[tuple[float, float]]:
        """Infusions as ``(time in days, amount in 10⁹ cells)``, the first at ``start``."""
        return [(start + i * self.interval, self.dose) for i in range(self.n_infusions)]

    @property
    def total_cells(self) -> float:
        """Cells over the whole regimen (10⁹)."""
        return self.dose * self.n_infusions

    @property
    def label(self) -> str:
        """Short readable name, e.g. ``3x2e9 q3d`` or ``3x2e9 q3d LD0.5``."""
        s = f"{self.n_infusions}x{self.dose:g}e9 q{self.interval:g}d"
        if self.ld_scale != 1.0:
            s += " noLD" if self.ld_scale == 0 else f" LD{self.ld_scale:g}"
        return s

    def as_dict(self) -> dict[str, Any]:
        """Plain mapping ``dose, interval, n_infusions, ld_scale`` (CSV columns, attrs)."""
        return {
            "dose": float(self.dose),
            "interval": float(self.interval),
            "n_infusions": int(self.n_infusions),
            "ld_scale": float(self.ld_scale),
        }

    @classmethod
    def coerce(cls, value: Any) -> Regimen:
        """A Regimen from a Regimen, a tuple ``(dose, interval, n_infusions[, ld_scale])`` or a mapping
        with those keys, e.g. ``Regimen.coerce((2.0, 3.0, 3))``; raises TypeError/ValueError naming
        what is wrong."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"dose", "interval", "n_infusions", "ld_scale"}
            if unknown:
                raise ValueError(f"regimen: unknown key(s) {sorted(unknown)} (expected dose, interval, "
                                 "n_infusions, ld_scale)")  # fmt: skip
            missing = [k for k in ("dose", "interval", "n_infusions") if k not in value]
            if missing:
                raise ValueError(f"regimen: missing key(s) {missing} (found {dict(value)!r})")
            return cls(**value)
        if isinstance(value, (tuple, list)) and len(value) in (3, 4):
            return cls(*value)
        raise TypeError(
            "a regimen is a Regimen, a tuple (dose 10⁹ cells, interval days, n_infusions[, ld_scale]) or a "
            f"mapping with those keys (found {value!r})"
        )

    @classmethod
    def from_dose_level(cls, dl: Any, ld_scale: float = 1.0) -> Regimen:
        """From a :class:`~carnk_pkpd.spec.DoseLevelSpec` (``dose``, ``interval``, ``n_infusions``)."""
        return cls(float(dl.dose), float(dl.interval), int(dl.n_infusions), ld_scale)
