"""Ranks called differently fail together, at once, with the difference named (instead of waiting for a
collective that never comes, or returning masks that one process would not)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import WORLD_SIZE, spawn_ranks
from torch import nn

import ecp_fast
from ecp_fast import Pruner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def _batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1 + rank)
    return [torch.randn(12, 6, generator=generator, dtype=torch.float64) for _ in range(2)]


def _error(call: Any) -> str | None:
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a short timeout: a regression that makes one rank wait fails here instead of hanging the suite
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        results: dict[str, Any] = {}
        sensitivity = ("local", "output")[rank]
        results["sensitivity"] = _error(
            lambda: Pruner(_model(), sensitivity=sensitivity, progress=False).calibrate(_batches(rank))
        )
        pruner = Pruner(_model(), sensitivity="local", progress=False)
        pruner.calibrate(_batches(rank))
        method = ("ecp-obs", "sparsegpt")[rank]
        results["method"] = _error(lambda: pruner.prune(0.5, method=method))
        results["sparsity"] = _error(lambda: pruner.prune((0.5, 0.6)[rank], method="sparsegpt"))
        blocks = nn.ModuleList([_model(), _model()])
        inputs = [torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))]
        method_of_rank = ("ecp", "magnitude")[rank]
        results["sequential"] = _error(
            lambda: ecp_fast.prune_sequential(blocks, inputs, 0.5, method=method_of_rank, progress=False)
        )
        alone = Pruner(_model(), progress=False)
        results["alone"] = alone.prune(0.5, method="magnitude").sparsity if rank == 0 else None  # no collective
        empty = _batches(rank) if rank == 0 else []
        results["empty"] = _error(lambda: Pruner(_model(), sensitivity="local", progress=False).calibrate(empty))
        results["agreed"] = pruner.prune(0.5, method="sparsegpt").sparsity
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_rank_main, tmp_path_factory.mktemp("agreement"), WORLD_SIZE)


def test_a_different_sensitivity_fails_on_every_rank(rank_results: list[dict[str, Any]]) -> None:
    for results in rank_results:
        assert "every rank must calibrate the same" in results["sensitivity"]
        assert "'local'" in results["sensitivity"] and "'output'" in results["sensitivity"]


@pytest.mark.parametrize("case", ["method", "sparsity", "sequential"])
def test_a_different_prune_call_fails_on_every_rank(rank_results: list[dict[str, Any]], case: str) -> None:
    what = "prune_sequential" if case == "sequential" else "Pruner.prune"
    for results in rank_results:
        assert results[case] is not None and f"{what}: rank 1 was called with" in results[case]


def test_a_rank_without_data_makes_every_rank_fail_at_once(rank_results: list[dict[str, Any]]) -> None:
    assert "rank 1 failed before the merge" in rank_results[0]["empty"]
    assert "calibration data is empty" in rank_results[1]["empty"]
    assert [results["agreed"] for results in rank_results] == [pytest.approx(0.5)] * WORLD_SIZE


def test_a_prune_without_collectives_runs_on_one_rank_alone(rank_results: list[dict[str, Any]]) -> None:
    assert rank_results[0]["alone"] == pytest.approx(0.5)
