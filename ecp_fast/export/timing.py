"""Interleaved timing: the contenders of one comparison take turns, so a busy machine slows all alike.

Used to measure the dense/CSR crossover of a layer (:func:`ecp_fast.export.csr.choose_csr_layers`),
by ``ecp-fast export`` and by every benchmark report (``bench/harness.py``). Report ratios within one
run, never absolute times across runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: A burst of calls is sized to last about this long: short enough to fit in one scheduler slice of
#: a loaded machine, long enough that the clock's resolution does not matter.
BURST_SECONDS = 2e-3


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the rounds: the minimum (least disturbed), the median and the 20% and 80% quantiles."""

    minimum: float
    median: float
    rounds: int
    q20: float
    q80: float


def _quantile(ordered: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of sorted values, linear between the two nearest (numpy's default)."""
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _timing(values: Sequence[float]) -> Timing:
    ordered = sorted(values)
    return Timing(
        ordered[0], statistics.median(ordered), len(ordered), _quantile(ordered, 0.2), _quantile(ordered, 0.8)
    )


def _burst_size(call: Callable[[], object], warmup: int, burst_seconds: float, setup: Callable[[], object]) -> int:
    per_call = 0.0
    for _ in range(warmup):
        setup()
        start = time.perf_counter()
        call()
        per_call += time.perf_counter() - start
    per_call /= warmup
    return max(1, min(10_000, int(burst_seconds / max(per_call, 1e-9))))


def _nothing() -> None:
    return None


def _check_timing_arguments(
    calls: object, rounds: object, warmup: object, burst_seconds: object, setup: Mapping[str, object] | None
) -> None:
    """``TypeError`` / ``ValueError`` naming a bad argument of :func:`interleaved_times`."""
    if not isinstance(calls, Mapping) or not all(callable(call) for call in calls.values()):
        raise TypeError(f"argument 'calls' must map names to zero-argument callables, got {calls!r}")
    for name, value in (("rounds", rounds), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"argument {name!r} must be an integer of at least 1, got {value!r}")
    if isinstance(burst_seconds, bool) or not isinstance(burst_seconds, (int, float)) or not burst_seconds > 0:
        raise ValueError(f"argument 'burst_seconds' must be a positive number of seconds, got {burst_seconds!r}")
    unknown = sorted(set(setup or {}) - set(calls))
    if unknown:
        raise ValueError(f"argument 'setup' names contenders that are not in 'calls': {unknown}")


def interleaved_times(
    calls: Mapping[str, Callable[[], object]],
    rounds: int = 20,
    warmup: int = 3,
    burst: int | None = None,
    burst_seconds: float = BURST_SECONDS,
    *,
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Time every call of ``calls`` in ``rounds`` interleaved rounds of one burst each.

    Args:
        calls: name -> zero-argument callable.
        rounds: rounds; each round times one burst of every contender in turn.
        warmup: untimed calls per contender first (also used to size the bursts).
        burst: calls per burst; None sizes each contender's burst to about ``burst_seconds``.
        burst_seconds: target length of a burst when ``burst`` is None (shorter bursts are more
            often undisturbed on a loaded machine; longer ones average more calls).
        setup: name -> zero-argument callable run untimed before each warm-up call and each burst
            of that contender (e.g. a fresh copy of a model that the call changes).
    """
    _check_timing_arguments(calls, rounds, warmup, burst_seconds, setup)
    setups = {name: (setup or {}).get(name, _nothing) for name in calls}
    bursts = {name: _burst_size(call, warmup, burst_seconds, setups[name]) for name, call in calls.items()}  # warms up
    if burst is not None:
        bursts = dict.fromkeys(bursts, max(1, burst))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            count = bursts[name]
            setups[name]()
            start = time.perf_counter()
            for _ in range(count):
                call()
            samples[name].append((time.perf_counter() - start) / count)
    return {name: _timing(values) for name, values in samples.items()}
