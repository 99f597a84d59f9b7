"""Interleaved timing: the contenders of one comparison take turns, so a busy machine slows all alike.

Used to measure the dense/CSR crossover of a layer (:func:`ecp_fast.export.csr.choose_csr_layers`),
by ``ecp-fast export`` and by ``bench/export_report.py``. Report ratios within one run, never
absolute times across runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

#: A burst of calls is sized to last about this long: short enough to fit in one scheduler slice of
#: a loaded machine, long enough that the clock's resolution does not matter.
BURST_SECONDS = 2e-3


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the rounds: the minimum (least disturbed) and the median."""

    minimum: float
    median: float
    rounds: int


def _burst_size(call: Callable[[], object], warmup: int, burst_seconds: float) -> int:
    start = time.perf_counter()
    for _ in range(warmup):
        call()
    per_call = (time.perf_counter() - start) / warmup
    return max(1, min(10_000, int(burst_seconds / max(per_call, 1e-9))))


def interleaved_times(
    calls: Mapping[str, Callable[[], object]],
    rounds: int = 20,
    warmup: int = 3,
    burst: int | None = None,
    burst_seconds: float = BURST_SECONDS,
) -> dict[str, Timing]:
    """Time every call of ``calls`` in ``rounds`` interleaved rounds of one burst each.

    Args:
        calls: name -> zero-argument callable.
        rounds: rounds; each round times one burst of every contender in turn.
        warmup: untimed calls per contender first (also used to size the bursts).
        burst: calls per burst; None sizes each contender's burst to about ``burst_seconds``.
        burst_seconds: target length of a burst when ``burst`` is None (shorter bursts are more
            often undisturbed on a loaded machine; longer ones average more calls).
    """
    if rounds < 1 or warmup < 1:
        raise ValueError(f"arguments 'rounds' and 'warmup' must be at least 1, got {rounds} and {warmup}")
    bursts = {name: _burst_size(call, warmup, burst_seconds) for name, call in calls.items()}  # warms up too
    if burst is not None:
        bursts = dict.fromkeys(bursts, max(1, burst))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            count = bursts[name]
            start = time.perf_counter()
            for _ in range(count):
                call()
            samples[name].append((time.perf_counter() - start) / count)
    return {name: Timing(min(values), statistics.median(values), rounds) for name, values in samples.items()}
