"""Regenerate the package's embedded SYNTHETIC reference cohort (``resources/reference_cohort.csv``).

20 virtual subjects at dose levels 1/1/5/13 (the ACR 2024 L17 mix) from ``models/reference.toml``, seed
20241119. Follow-up is drawn like the trial (median ~5 months, range 1–12) and assigned in enrolment
order (dose escalation: lower IDs and dose levels enrolled first, so followed longest); at least 8
subjects are followed for more than 6 months, as in the abstract. Every number is simulated.

Usage::

    python benchmarks/make_reference_cohort.py            # rewrite the packaged file
    python benchmarks/make_reference_cohort.py --out x.csv
    python benchmarks/make_reference_cohort.py --check    # exit 1 if the packaged file differs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from carnk_pkpd.cohortsim import draw_follow_up_months, months_to_days, simulate_cohort
from carnk_pkpd.data import Cohort, write_cohort

SEED = 20241119
MODEL = "reference"
DOSE_LEVELS = {"1": 1, "2": 1, "3": 5, "4": 13}
MIN_LONG = 8  # subjects followed > 6 months (ACR 2024 L17: 8 of 20)
LONG_RANGE_MONTHS = (6.5, 12.0)
TARGET = Path(__file__).resolve().parents[1] / "src" / "carnk_pkpd" / "resources" / "reference_cohort.csv"


def reference_follow_up(seed: int = SEED, n: int = 20) -> np.ndarray:
    """Follow-up days per subject in ID order (longest first), at least ``MIN_LONG`` above 6 months."""
    rng = np.random.default_rng(seed)
    months = np.sort(draw_follow_up_months(rng, n))[::-1].copy()
    extra = rng.uniform(*LONG_RANGE_MONTHS, MIN_LONG)
    long_enough = months > 6.0
    missing = MIN_LONG - int(long_enough.sum())
    if missing > 0:
        months[:MIN_LONG] = np.sort(np.maximum(months[:MIN_LONG], extra))[::-1]
    return np.round(np.minimum(months_to_days(months), 365.0), 1)


def make_reference_cohort(seed: int = SEED) -> Cohort:
    """The embedded reference cohort (SYNTHETIC) for ``seed``."""
    follow_up = reference_follow_up(seed, sum(DOSE_LEVELS.values()))
    cohort, _ = simulate_cohort(MODEL, DOSE_LEVELS, seed=seed, follow_up=follow_up)
    note = (
        f"Reference cohort of carnk_pkpd (benchmarks/make_reference_cohort.py): follow-up in enrolment "
        f"order, {int((follow_up > 182.5).sum())} of {follow_up.size} subjects followed > 6 months."
    )
    return Cohort.from_dataframe(cohort.to_dataframe(), comments=(*cohort.comments, note))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=TARGET, help="where to write (default: the packaged file)"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    args = parser.parse_args(argv)
    cohort = make_reference_cohort(args.seed)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_cohort(cohort, Path(tmp) / "reference_cohort.csv").read_bytes()
        same = args.out.is_file() and args.out.read_bytes() == fresh
        print(f"{args.out}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    write_cohort(cohort, args.out)
    print(f"wrote {args.out} ({len(cohort.subjects)} subjects, SYNTHETIC)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
