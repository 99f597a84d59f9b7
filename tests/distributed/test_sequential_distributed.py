"""Sequential pruning under torch.distributed: two gloo processes on loopback.

One ``torch.multiprocessing.spawn`` of two ranks (file:// rendezvous in ``tmp_path``) runs
:func:`prune_sequential` with and without ``synchronize`` and saves what each rank ended with; the
tests compare those files with each other and with single-process runs computed here.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch import nn

from ecp_fast import get_masks
from ecp_fast.distributed import shard
from ecp_fast.pruning.sequential import prune_sequential

WORLD_SIZE = 2
WIDTH = 8
TOKENS = 3
#: Batches of the merged runs: 4, 6, 8, 10, 12 sequences; rank 0 gets batches 0, 2, 4 and rank 1 batches 1, 3.
BATCH_SIZES = (4, 6, 8, 10, 12)
#: Each rank's own data in the unmerged runs (rank 0: two batches, rank 1: three).
OWN_BATCHES = (2, 3)
#: Rademacher probes and two steps (a recalibration between them): neither may merge without synchronize.
OWN_ARGS = dict(sensitivity="output", probes=2, steps=2, scope="global", seed=5)


class MLPBlock(nn.Module):
    """``x + fc2(relu(fc1(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def make_blocks() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList([MLPBlock(), MLPBlock()]).double()


def all_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, TOKENS, WIDTH, generator=generator, dtype=torch.float64) for size in BATCH_SIZES]


def own_inputs(rank: int) -> list[torch.Tensor]:
    """Different data on every rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(5, TOKENS, WIDTH, generator=generator, dtype=torch.float64) for _ in range(OWN_BATCHES[rank])]


def run(inputs: list[torch.Tensor], **kwargs: Any) -> dict[str, Any]:
    """Prune a fresh stack; its masks and weights, and the report's counts."""
    blocks = make_blocks()
    report = prune_sequential(blocks, inputs, 0.5, progress=False, **kwargs)
    state = {f"{name}.mask": mask for name, mask in get_masks(blocks).items()}
    state.update({name: tensor.detach().clone() for name, tensor in blocks.state_dict().items()})
    return {"state": state, "samples": report.samples, "batches": report.batches}


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {
            "own": run(own_inputs(rank), synchronize=False, **OWN_ARGS),
            "merged": run(list(shard(all_inputs())), sensitivity="local"),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_rank_main, tmp_path_factory.mktemp("sequential_distributed"), WORLD_SIZE)


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{key} differs"


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_without_synchronize_each_rank_prunes_as_it_would_alone(
    rank_results: list[dict[str, Any]], rank: int, one_thread: None
) -> None:
    alone = run(own_inputs(rank), synchronize=False, **OWN_ARGS)  # no process group here
    assert_same_state(rank_results[rank]["own"]["state"], alone["state"])
    # The report counts this rank's own data, which is all its statistics came from.
    assert (rank_results[rank]["own"]["samples"], rank_results[rank]["own"]["batches"]) == (
        alone["samples"],
        alone["batches"],
    )
    assert alone["batches"] == OWN_BATCHES[rank] and alone["samples"] == 5 * TOKENS * OWN_BATCHES[rank]


def test_without_synchronize_the_ranks_masks_differ(rank_results: list[dict[str, Any]]) -> None:
    first, second = (result["own"]["state"] for result in rank_results)
    assert any(not torch.equal(first[key], second[key]) for key in first if key.endswith("mask"))


def test_merged_run_reports_the_totals_over_all_ranks(rank_results: list[dict[str, Any]]) -> None:
    for result in rank_results:  # what Pruner.calibrate reports: the merged counts, on every rank
        assert result["merged"]["samples"] == sum(BATCH_SIZES) * TOKENS
        assert result["merged"]["batches"] == len(BATCH_SIZES)
    assert_same_state(rank_results[1]["merged"]["state"], rank_results[0]["merged"]["state"])
