"""pytest-benchmark suite at scale: prune a ~100M-parameter MLP stack, whole-model vs sequential.

Heavy (minutes, a few GiB), so it is skipped unless ``ECP_FAST_BENCH_SCALE=1``
(``ECP_FAST_BENCH_SCALE_WIDTH`` and ``ECP_FAST_BENCH_SCALE_BLOCKS`` shrink it for a quick check)::

    ECP_FAST_BENCH_SCALE=1 nice -n 10 .venv/bin/python -m pytest bench/bench_scale.py --benchmark-only

Each round builds a fresh model (untimed) and times calibration + pruning. Peak memory of each mode
in its own process is what ``bench/scale_report.py`` measures; here the peak RSS of the benchmark
process so far is recorded in ``extra_info`` for reference only.
"""

from __future__ import annotations

import os
import resource
from functools import partial

import pytest

if os.environ.get("ECP_FAST_BENCH_SCALE") != "1":
    pytest.skip("set ECP_FAST_BENCH_SCALE=1 to run the 100M-parameter scale benchmark", allow_module_level=True)

from scale_report import Config, make_batches, make_stack, prune_mode

CONFIG = Config(
    width=int(os.environ.get("ECP_FAST_BENCH_SCALE_WIDTH", Config.width)),
    blocks=int(os.environ.get("ECP_FAST_BENCH_SCALE_BLOCKS", Config.blocks)),
)


def _setup() -> tuple[tuple, dict]:
    model = make_stack(CONFIG.width, CONFIG.blocks)
    batches = make_batches(CONFIG.width, CONFIG.tokens, CONFIG.batch_size, CONFIG.sequence)
    return (model, batches), {}


@pytest.mark.parametrize("mode", ["sequential", "whole"])
def bench_prune_100m_local(benchmark, mode: str) -> None:
    benchmark.group = "scale-100M-local"
    benchmark.extra_info.update(
        width=CONFIG.width, blocks=CONFIG.blocks, tokens=CONFIG.tokens, sparsity=CONFIG.sparsity, scope=CONFIG.scope
    )
    sparsity = benchmark.pedantic(partial(prune_mode, mode=mode, config=CONFIG), setup=_setup, rounds=1, iterations=1)
    benchmark.extra_info["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert sparsity == pytest.approx(CONFIG.sparsity, abs=1e-3)
