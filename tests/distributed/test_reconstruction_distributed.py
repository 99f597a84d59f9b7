"""Reconstructive pruning under torch.distributed: two gloo ranks, each on its shard, must end alike.

The Gram matrices, the cross terms, the forward order and the allocation search's divergences are
summed or agreed across the ranks, so ``ecp-obs``, ``sparsegpt`` and ``reconstruct=True`` give the
same state on every rank, and the state of one process on all the batches (float64 models). One
``torch.multiprocessing.spawn`` of two ranks (file:// rendezvous) runs every scenario and saves what
each rank ended with; the tests compare those files with single-process runs computed here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch import nn

from ecp_fast import Pruner, prune_sequential
from ecp_fast.distributed import shard
from ecp_fast.pruning import allocation, reconstruction
from ecp_fast.pruning.layers import LayerSpec

WORLD_SIZE = 2
BATCHES = 6
BATCH_SIZE = 10
SPARSITY = 0.5


# ---- shared set-up (used by the ranks and by the single-process reference) ----------------------------


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 14), nn.Tanh(), nn.Linear(14, 10), nn.ReLU(), nn.Linear(10, 5)).double()


def make_batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            1.0 + torch.randn(BATCH_SIZE, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 5, (BATCH_SIZE,), generator=generator),
        )
        for _ in range(BATCHES)
    ]


def make_offside_model() -> nn.Module:
    """Its ReLU units are all off on the even batches (rank 0's shard): there, the first layer's
    sensitivities are 0 on every sample, so rank 0 alone leaves that layer's sample weights out."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.fill_(-0.1)
    return model


def make_offside_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    batches = []
    for index in range(BATCHES):
        magnitude = 0.5 + torch.rand(BATCH_SIZE, 4, generator=generator, dtype=torch.float64)
        batches.append(-magnitude if index % 2 == 0 else magnitude)
    return batches


def make_blocks() -> nn.ModuleList:
    torch.manual_seed(2)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)) for _ in range(2))
    return blocks.double()


def make_block_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randn(BATCH_SIZE, 6, generator=generator, dtype=torch.float64) for _ in range(BATCHES)]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def run_pruner(scenario: str, batches: list[Any]) -> dict[str, torch.Tensor]:
    method, kwargs = SCENARIOS[scenario]
    model = make_offside_model() if scenario == "ecp-obs offside" else make_model()
    pruner = Pruner(model, sensitivity="output", seed=7, progress=False)
    pruner.calibrate(batches)
    pruner.prune(sparsity=SPARSITY, method=method, **kwargs)
    return state_of(model)


def run_sequential(batches: list[Any]) -> dict[str, torch.Tensor]:
    blocks = make_blocks()
    prune_sequential(blocks, batches, SPARSITY, method="ecp-obs", scope="row", progress=False)
    return state_of(blocks)


SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "ecp-obs search": ("ecp-obs", {"scope": "global"}),  # the allocation search compares divergences
    "ecp-obs layer": ("ecp-obs", {"scope": "layer"}),
    "sparsegpt": ("sparsegpt", {"scope": "layer"}),
    "magnitude refit": ("magnitude", {"scope": "global", "reconstruct": True}),
    "ecp-obs offside": ("ecp-obs", {"scope": "layer"}),
}


def _data(scenario: str) -> list[Any]:
    return make_offside_batches() if scenario == "ecp-obs offside" else make_batches()  # type: ignore[return-value]


# ---- the ranks -----------------------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the offside scenario warns on rank 0 alone
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results: dict[str, Any] = {}
        for scenario in SCENARIOS:
            results[scenario] = run_pruner(scenario, list(shard(_data(scenario))))
        results["sequential"] = run_sequential(list(shard(make_block_inputs())))
        results.update(_helpers(rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _helpers(rank: int) -> dict[str, Any]:
    """The collectives one at a time: Gram matrices, divergences and the divergence's choice."""
    model = make_model()
    spec = LayerSpec("2", model[2], "linear")
    batches = [inputs for inputs, _ in make_batches()]
    mine = batches if rank == 0 else []  # rank 1 has no batch: it adds zeros
    hessian = _attempt(lambda: reconstruction.layer_grams(model, None, spec, mine, None)[0])
    # on every rank alike: the layer runs on no rank's batches
    nowhere = _attempt(lambda: reconstruction.layer_grams(model, None, spec, [], None))
    outputs = [model(inputs).detach() for inputs in shard(batches)]
    divergence = allocation.output_divergence(outputs, [output + 0.5 for output in outputs], "mse")
    # Rank 0's first batch decides: class targets there (KL), a regression's on rank 1.
    first = make_batches()[0] if rank == 0 else (batches[0], torch.randn(BATCH_SIZE, 5, dtype=torch.float64))
    kind, _ = allocation.resolve_divergence("auto", [first], model)
    return {"hessian": hessian, "nowhere": nowhere, "divergence": divergence, "kind": kind}


def _attempt(compute: Any) -> Any:
    """What ``compute()`` returns, or the message of the ValueError it raises."""
    try:
        return compute()
    except ValueError as error:
        return str(error)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_rank_main, tmp_path_factory.mktemp("reconstruction_distributed"), WORLD_SIZE)


# ---- comparisons ---------------------------------------------------------------------------------------


def assert_states_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("_mask"):
            assert torch.equal(actual[key], value), f"{key} differs"
        else:
            torch.testing.assert_close(actual[key], value, rtol=1e-8, atol=1e-10, msg=key)


@pytest.mark.parametrize("scenario", [*SCENARIOS, "sequential"])
def test_every_rank_ends_identical(rank_results: list[dict[str, Any]], scenario: str) -> None:
    first, second = (rank_results[rank][scenario] for rank in range(WORLD_SIZE))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"{scenario}: {key} differs between ranks"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_match_single_process_on_union(rank_results: list[dict[str, Any]], scenario: str) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    try:
        single = run_pruner(scenario, _data(scenario))
    finally:
        logging.disable(logging.NOTSET)
    assert any(key.endswith("_mask") for key in single)
    for rank in range(WORLD_SIZE):
        assert_states_match(rank_results[rank][scenario], single)


def test_sequential_ecp_obs_matches_single_process(rank_results: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    single = run_sequential(make_block_inputs())
    for rank in range(WORLD_SIZE):
        assert_states_match(rank_results[rank]["sequential"], single)


def test_collectives_sum_and_agree_across_ranks(rank_results: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    model = make_model()
    spec = LayerSpec("2", model[2], "linear")
    batches = [inputs for inputs, _ in make_batches()]
    single, _ = reconstruction.layer_grams(model, None, spec, batches, None)
    outputs = [model(inputs).detach() for inputs in batches]
    divergence = allocation.output_divergence(outputs, [output + 0.5 for output in outputs], "mse")
    for rank in range(WORLD_SIZE):
        got = rank_results[rank]
        torch.testing.assert_close(got["hessian"], single, rtol=1e-12, atol=1e-10)
        assert isinstance(got["nowhere"], str) and "runs on none of them" in got["nowhere"]
        assert got["divergence"] == pytest.approx(divergence, rel=1e-12)
        assert got["kind"] == "kl"
    assert torch.equal(rank_results[0]["hessian"], rank_results[1]["hessian"])
