"""Distributed calibration: two gloo processes on loopback must match one process on the union of data.

One ``torch.multiprocessing.spawn`` of two ranks (file:// rendezvous in ``tmp_path``) runs every
scenario and saves what each rank ended with; the tests compare those files with single-process
runs computed here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch import nn

from ecp_fast import Pruner, get_masks
from ecp_fast.distributed import (
    RANK_SEED_STRIDE,
    SYNCHRONIZED_KEY,
    Shard,
    broadcast_module,
    communication_device,
    per_rank_probe_seed,
    rank_seed,
    shard,
    synchronize_calibration,
)
from ecp_fast.ops.merge import Moments
from ecp_fast.pruning.calibration import CalibrationResult, LayerStatistics

WORLD_SIZE = 2
BATCHES = 10
BATCH_SIZE = 12
SPARSITY = 0.6


# ---- shared set-up (used by the ranks and by the single-process reference) ----------------------------


def make_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 5)).to(dtype)


def make_batches(dtype: torch.dtype, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(BATCHES):
        # A large common offset: the inputs' mean dwarfs their spread, the hard case for the merge.
        inputs = 3.0 + 0.5 * torch.randn(BATCH_SIZE, 6, generator=generator, dtype=torch.float64)
        targets = torch.randn(BATCH_SIZE, 5, generator=generator, dtype=torch.float64)
        batches.append((inputs.to(dtype), targets.to(dtype)))
    return batches


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks and biases of every pruned layer."""
    state = {f"{name}.mask": mask for name, mask in get_masks(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            state[f"{name}.bias"] = module.bias.detach().clone()
    return state


def statistics_of(result: CalibrationResult) -> dict[str, Any]:
    return {
        "samples": result.samples,
        "batches": result.batches,
        "inputs": result.inputs,
        "layers": {
            name: {
                "s0": stats.moments.s0,
                "mean": stats.moments.mean,
                "m2": stats.moments.m2,
                "activation_sq_sum": stats.activation_sq_sum,
                "loss_grad_sum": stats.loss_grad_sum,
                "samples": stats.samples,
            }
            for name, stats in result.statistics.items()
        },
    }


def run_scenario(
    dtype: torch.dtype,
    sensitivity: str,
    method: str,
    batches: list[Any],
    distributed: bool,
    probes: int | None = None,
    strategy: str = "allreduce",
) -> dict[str, Any]:
    model = make_model(dtype)
    # keep_inputs: the replay inputs are gathered across ranks only when asked for.
    pruner = Pruner(model, sensitivity=sensitivity, probes=probes, seed=7, progress=False, keep_inputs=True)
    loss_fn = nn.MSELoss() if sensitivity == "loss" or method == "gradient" else None
    if distributed and probes is not None:
        with per_rank_probe_seed(pruner):
            pruner.calibrate(batches, loss_fn=loss_fn)
    else:
        pruner.calibrate(batches, loss_fn=loss_fn)
    if distributed:
        pruner.calibration = synchronize_calibration(pruner.calibration, strategy=strategy)
    pruner.prune(sparsity=SPARSITY, method=method, scope="global")
    return {"statistics": statistics_of(pruner.calibration), "state": state_of(model)}


SCENARIOS = {
    "output64": dict(dtype=torch.float64, sensitivity="output", method="ecp"),
    "output64_gather": dict(dtype=torch.float64, sensitivity="output", method="ecp", strategy="gather"),
    "loss64_gradient": dict(dtype=torch.float64, sensitivity="loss", method="gradient"),
    "loss64_ecp": dict(dtype=torch.float64, sensitivity="loss", method="ecp"),
    "output32": dict(dtype=torch.float32, sensitivity="output", method="ecp"),
    "probes32": dict(dtype=torch.float32, sensitivity="output", method="ecp", probes=3),
    "random32": dict(dtype=torch.float32, sensitivity="local", method="random"),
}


# ---- the ranks -----------------------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results: dict[str, Any] = {}
        for name, config in SCENARIOS.items():
            config = dict(config)
            batches = list(shard(make_batches(config["dtype"])))
            results[name] = run_scenario(batches=batches, distributed=True, **config)

        # Merging twice must not count the data twice.
        model = make_model(torch.float64)
        pruner = Pruner(model, sensitivity="local", progress=False)
        pruner.calibrate(shard(make_batches(torch.float64)))
        once = synchronize_calibration(pruner.calibration)
        twice = synchronize_calibration(once)
        results["idempotent"] = twice is once and once.extra.get(SYNCHRONIZED_KEY) == world_size

        # Ranks that calibrated different layers fail together instead of hanging.
        layers = ["0"] if rank == 0 else ["2"]
        pruner = Pruner(make_model(torch.float64), sensitivity="local", layers=layers, progress=False)
        try:  # calibrate too: the merge may run inside it
            pruner.calibrate(shard(make_batches(torch.float64)))
            synchronize_calibration(pruner.calibration)
            results["mismatch_error"] = None
        except ValueError as error:
            results["mismatch_error"] = str(error)
        results["rank_seed"] = rank_seed(7)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_rank_main, tmp_path_factory.mktemp("distributed"), WORLD_SIZE)


# ---- comparisons ---------------------------------------------------------------------------------------


def assert_statistics_close(actual: dict[str, Any], expected: dict[str, Any], rtol: float) -> None:
    assert actual["samples"] == expected["samples"]
    assert actual["batches"] == expected["batches"]
    assert actual["layers"].keys() == expected["layers"].keys()
    for layer, fields in expected["layers"].items():
        for field, value in fields.items():
            got = actual["layers"][layer][field]
            if value is None or isinstance(value, int):
                assert got == value, f"{layer}.{field}"
                continue
            scale = value.abs().max().clamp_min(1e-30)
            # Relative to each entry, with a floor relative to the tensor's largest entry for zeros.
            torch.testing.assert_close(got, value, rtol=rtol, atol=rtol * float(scale), msg=f"{layer}.{field}")


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], bias_rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith(".mask"):
            assert torch.equal(actual[key], value), f"{key} differs"
        else:
            torch.testing.assert_close(actual[key], value, rtol=bias_rtol, atol=bias_rtol, msg=key)


@pytest.mark.parametrize("scenario", ["output64", "output64_gather", "loss64_gradient", "loss64_ecp"])
def test_two_ranks_match_single_process_on_union(rank_results: list[dict[str, Any]], scenario: str) -> None:
    config = dict(SCENARIOS[scenario])
    config.pop("strategy", None)
    single = run_scenario(batches=make_batches(config["dtype"]), distributed=False, **config)
    for rank in range(WORLD_SIZE):
        got = rank_results[rank][scenario]
        assert_statistics_close(got["statistics"], single["statistics"], rtol=1e-6)
        assert_states_equal(got["state"], single["state"], bias_rtol=1e-9)
    # The replay inputs are the union in rank order (round-robin shards).
    inputs = rank_results[0][scenario]["statistics"]["inputs"]
    union = torch.cat([batch[0] for batch in make_batches(config["dtype"])])
    assert inputs is not None and inputs.shape == union.shape
    assert torch.isfinite(inputs).all()
    torch.testing.assert_close(inputs.sum(0), union.sum(0))


def test_float32_matches_single_process(rank_results: list[dict[str, Any]]) -> None:
    config = SCENARIOS["output32"]
    single = run_scenario(batches=make_batches(torch.float32), distributed=False, **config)
    for rank in range(WORLD_SIZE):
        got = rank_results[rank]["output32"]
        assert_statistics_close(got["statistics"], single["statistics"], rtol=1e-5)
        assert_states_equal(got["state"], single["state"], bias_rtol=1e-5)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_ends_bit_identical(rank_results: list[dict[str, Any]], scenario: str) -> None:
    first, second = (rank_results[rank][scenario] for rank in range(WORLD_SIZE))
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), f"{scenario}: {key} differs between ranks"
    for layer, fields in first["statistics"]["layers"].items():
        for field, value in fields.items():
            other = second["statistics"]["layers"][layer][field]
            assert (
                (value is None and other is None)
                or isinstance(value, int)
                and value == other
                or torch.equal(value, other)
            ), f"{scenario}: {layer}.{field} differs between ranks"


def test_random_method_and_probes_are_consistent(rank_results: list[dict[str, Any]]) -> None:
    # The random method draws from the pruner's seed at prune time: same masks as one process.
    single = run_scenario(batches=make_batches(torch.float32), distributed=False, **SCENARIOS["random32"])
    for rank in range(WORLD_SIZE):
        for key, value in single["state"].items():
            if key.endswith(".mask"):
                assert torch.equal(rank_results[rank]["random32"]["state"][key], value)
    # Probes are drawn per rank from distinct seeds; calibration still sees every sample once.
    assert [rank_results[rank]["rank_seed"] for rank in range(WORLD_SIZE)] == [7, 7 + RANK_SEED_STRIDE]
    stats = rank_results[0]["probes32"]["statistics"]
    assert stats["samples"] == BATCHES * BATCH_SIZE


def test_merge_is_idempotent_and_mismatch_fails_on_every_rank(rank_results: list[dict[str, Any]]) -> None:
    for rank in range(WORLD_SIZE):
        assert rank_results[rank]["idempotent"] is True
        error = rank_results[rank]["mismatch_error"]
        assert error is not None and "every rank must calibrate the same" in error


# ---- without torch.distributed -----------------------------------------------------------------------


def test_synchronize_is_a_noop_without_process_group() -> None:
    assert not dist.is_initialized()
    moments = Moments(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3))
    result = CalibrationResult(
        statistics={"a": LayerStatistics(moments, torch.zeros(3), None, 4)}, samples=4, batches=1
    )
    assert synchronize_calibration(result) is result
    with pytest.raises(ValueError, match="strategy"):
        synchronize_calibration(result, strategy="tree")
    with pytest.raises(TypeError, match="CalibrationResult"):
        synchronize_calibration({"a": 1})  # type: ignore[arg-type]


def test_shard_round_robin() -> None:
    items = list(range(7))
    shards = [shard(items, rank, 3) for rank in range(3)]
    assert [list(part) for part in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(part) for part in shards] == [3, 2, 2]
    assert sorted(x for part in shards for x in part) == items
    assert list(shards[0]) == list(shards[0])  # re-iterable over a list
    assert isinstance(shards[0], Shard)
    assert list(shard(items)) == items  # no process group: everything
    generator_shard = shard((x for x in range(5)), 1, 2)
    assert list(generator_shard) == [1, 3]
    with pytest.raises(ValueError, match="rank"):
        shard(items, 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        shard(items, 0, 0)
    with pytest.raises(ValueError, match="at least one"):
        shard([1], 0, 2)


def test_rank_seed_without_process_group() -> None:
    assert rank_seed(11) == 11

    class Holder:
        seed = 5

    holder = Holder()
    with per_rank_probe_seed(holder) as seed:
        assert seed == 5 and holder.seed == 5
    assert holder.seed == 5


def test_helpers_fall_back_to_one_process_without_a_process_group() -> None:
    """Like rank_and_world_size's (0, 1): no backend, so collectives would stage on the CPU."""
    assert not dist.is_initialized()
    assert communication_device() == torch.device("cpu")


@pytest.mark.parametrize("seed", ["x", 1.5, True, None])
def test_rank_seed_refuses_what_is_not_an_integer(seed: object) -> None:
    with pytest.raises(TypeError, match=r"argument 'seed' must be an integer, got " + type(seed).__name__):
        rank_seed(seed)  # type: ignore[arg-type]


def test_rank_seed_takes_integral_numbers_and_returns_an_int() -> None:
    seed = rank_seed(np.int64(7))
    assert seed == 7 and type(seed) is int


def test_shard_takes_integral_numbers_but_not_bools() -> None:
    items = list(range(5))
    part = shard(items, rank=np.int64(1), world_size=np.int32(2))
    assert list(part) == [1, 3] and len(part) == 2
    assert type(part.rank) is int and type(part.world_size) is int
    with pytest.raises(ValueError, match=r"argument 'rank' must be an integer in \[0, 2\), got True"):
        shard(items, rank=True, world_size=2)
    with pytest.raises(ValueError, match=r"argument 'world_size' must be a positive integer, got 2.0"):
        shard(items, rank=0, world_size=2.0)  # type: ignore[arg-type]


def test_missing_arguments_are_refused_with_their_names() -> None:
    with pytest.raises(TypeError, match="argument 'items' must be an iterable of batches, got NoneType"):
        shard(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'module' must be an nn.Module, got NoneType"):
        broadcast_module(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'pruner' must have a 'seed' attribute"):
        with per_rank_probe_seed(None):
            pass
    with pytest.raises(TypeError, match=r"this Shard has no length: its items \(generator\) have none"):
        len(shard(x for x in range(3)))


def test_pruner_keeps_inputs_only_when_asked_in_a_process_group(monkeypatch) -> None:
    """In a distributed run the calibration inputs are not kept (nor gathered) unless asked."""
    from ecp_fast.pruning import pruner as pruner_module
    from ecp_fast.pruning.importance import get_method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    batches = [torch.randn(8, 4, dtype=torch.float64)]
    single = Pruner(model, sensitivity="local", progress=False)
    single.calibrate(batches)
    assert single.keep_inputs and single.calibration.inputs is not None
    monkeypatch.setattr(pruner_module, "is_distributed", lambda group=None: True)
    distributed = Pruner(model, sensitivity="local", progress=False, process_group="group")
    assert distributed.process_group == "group" and not distributed.keep_inputs
    with pytest.raises(RuntimeError, match="keep_inputs=True"):
        distributed._check_ready(get_method("nonlinear"))
    assert Pruner(model, sensitivity="local", progress=False, keep_inputs=True).keep_inputs
