"""Long-running work that can be watched and stopped: nutpie's sampler in the background, polled from
the main thread so that Ctrl-C (KeyboardInterrupt) stops it within a second or two, and a one-line
summary of its progress (chains, iteration, phase, divergences so far, ETA) for the command line."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SamplerStatus", "sampler_status", "wait_for_sampler"]


def wait_for_sampler(sampler: Any, poll: float = 0.2) -> Any:
    """Wait for a non-blocking nutpie sampler (``nutpie.sample(..., blocking=False)``) and return its trace.

    The main thread sleeps in short steps, so a KeyboardInterrupt arrives at once; the sampler is then
    cancelled (its draws discarded) and the KeyboardInterrupt re-raised. Any other error cancels too.
    """
    try:
        while not _finished(sampler):
            time.sleep(poll)
        return sampler.wait()
    except BaseException:
        try:
            sampler.cancel()
        except Exception:  # noqa: BLE001 - the sampler may already be gone; the original error matters
            pass
        raise


def _finished(sampler: Any) -> bool:
    """nutpie 0.16's ``is_finished`` raises TimeoutError while the chains still run."""
    try:
        return bool(sampler.is_finished)
    except TimeoutError:
        return False


@dataclass(frozen=True)
class SamplerStatus:
    """Progress of all chains: ``done``/``total`` iterations (warm-up + draws, summed over chains)."""

    chains: int
    started: int
    warming_up: int
    done: int
    total: int
    per_chain_total: int
    divergences: int
    elapsed: float

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the pace so far (None before the first iteration)."""
        if self.done <= 0 or self.elapsed <= 0:
            return None
        return self.elapsed * (self.total - self.done) / self.done

    def describe(self) -> str:
        """E.g. ``4 chains, warm-up · iteration 340/2000 · 3 divergent · ETA 1:20`` (fits 80 columns
        beside a spinner and the elapsed time)."""
        sampling = self.started - self.warming_up
        if not self.started:
            phase = "starting"
        elif sampling == 0 or self.warming_up == 0:
            phase = "warm-up" if sampling == 0 else "sampling"
        else:
            phase = f"{self.warming_up}/{self.started} warm-up"
        per_chain = self.done // max(self.chains, 1)
        eta = self.eta_seconds
        eta_text = "ETA ?" if eta is None else f"ETA {int(eta // 60)}:{int(eta % 60):02d}"
        return (
            f"{self.chains} chain{'s' if self.chains != 1 else ''}, {phase} · iteration "
            f"{per_chain}/{self.per_chain_total} · {self.divergences} divergent · {eta_text}"
        )


def sampler_status(chains: Sequence[Any], started_at: float) -> SamplerStatus:
    """Summarise nutpie's ``ChainProgress`` list (``finished_draws``, ``total_draws``, ``divergences``,
    ``tuning``, ``started``) as a :class:`SamplerStatus`."""
    done = sum(int(getattr(c, "finished_draws", 0)) for c in chains)
    totals = [int(getattr(c, "total_draws", 0)) for c in chains]
    started = [bool(getattr(c, "started", True)) for c in chains]
    warming = sum(1 for c, s in zip(chains, started, strict=True) if s and bool(getattr(c, "tuning", False)))
    return SamplerStatus(
        chains=len(chains),
        started=sum(started),
        warming_up=warming,
        done=done,
        total=sum(totals),
        per_chain_total=max(totals, default=0),
        divergences=sum(int(getattr(c, "divergences", 0)) for c in chains),
        elapsed=time.perf_counter() - started_at,
    )
