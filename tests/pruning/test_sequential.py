"""Sequential (block-by-block) pruning: same result as a per-block Pruner fed the pruned blocks' outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ecp_fast import Pruner, get_masks
from ecp_fast.pruning.sequential import SequentialReport, prune_sequential

WIDTH = 8
TOKENS = 5


class MLPBlock(nn.Module):
    """Transformer-style MLP block: ``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, width: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


def make_stack(blocks: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # The first block has no bias on fc1: compensation must add one (and undo must remove it).
    return nn.Sequential(*[MLPBlock(WIDTH, bias=index != 0) for index in range(blocks)])


def make_inputs(batches: int = 4, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [1.5 + torch.randn(3, TOKENS, WIDTH, generator=generator) for _ in range(batches)]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"{name}.mask": mask for name, mask in get_masks(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            state[f"{name}.bias"] = None if module.bias is None else module.bias.detach().clone()
            state[f"{name}.weight"] = module.weight.detach().clone()
    return state


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    got, want = state_of(actual), state_of(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert torch.equal(got[key], value), f"{key} differs"


def per_block_reference(
    stack: nn.Sequential, inputs: list[torch.Tensor], sensitivity: str, probes: int | None = None, **prune_args: object
) -> list[list[torch.Tensor]]:
    """Prune each block with its own Pruner on the outputs of the already-pruned blocks; returns block inputs."""
    block_inputs = []
    activations = inputs
    for block in stack:
        block_inputs.append(activations)
        pruner = Pruner(block, sensitivity=sensitivity, probes=probes, seed=3, progress=False)
        pruner.calibrate(activations)
        pruner.prune(**prune_args)
        block.eval()
        with torch.no_grad():
            activations = [block(batch) for batch in activations]
    return block_inputs


@pytest.mark.parametrize(
    "sensitivity, probes, method, scope",
    [
        ("local", None, "ecp", "layer"),
        ("local", None, "ecp", "global"),
        ("local", None, "wanda", "2:4"),
        ("output", 4, "ecp", "layer"),
    ],
)
def test_matches_per_block_pruner(sensitivity: str, probes: int | None, method: str, scope: str) -> None:
    stack = make_stack()
    reference = copy.deepcopy(stack)
    inputs = make_inputs()
    sparsity = None if ":" in scope else 0.6
    report = prune_sequential(
        stack,
        inputs,
        sparsity=sparsity,
        method=method,
        sensitivity=sensitivity,
        scope=scope,
        probes=probes,
        seed=3,
        progress=False,
    )
    per_block_reference(reference, inputs, sensitivity, probes, sparsity=sparsity, method=method, scope=scope)
    assert_same_state(stack, reference)
    assert isinstance(report, SequentialReport)
    assert len(report.blocks) == 3
    assert report.samples == 60 and report.batches == 4  # tokens: 4 batches of (3, 5, d)
    assert report.sparsity == pytest.approx(0.5 if sparsity is None else 0.6, abs=5e-3)
    assert "block" in str(report)
    assert report.blocks[0].report.added_biases == (["fc1"] if method == "ecp" else [])


@pytest.mark.parametrize(
    "sparsity, scope, target",
    [(None, "2:4", 0.5), (None, "layer", 0.9), (None, "row", 0.9), (0.6, "global", 0.6), (0.5, "2:4", 0.5)],
)
def test_report_target_is_the_resolved_sparsity(sparsity: float | None, scope: str, target: float) -> None:
    report = prune_sequential(make_stack(2), make_inputs(2), sparsity, scope=scope, progress=False)
    # As each block's PruneReport has it: implied by an N:M pattern, the default 0.9 for sparsity=None.
    assert report.target_sparsity == pytest.approx(target)
    assert all(block.report.target_sparsity == pytest.approx(target) for block in report.blocks)
    assert f"target={target:.4g} " in str(report).splitlines()[0]


def test_blocks_are_fed_the_pruned_outputs() -> None:
    stack = make_stack()
    dense = copy.deepcopy(stack)
    inputs = make_inputs()
    seen: dict[int, list[torch.Tensor]] = {1: [], 2: []}

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            seen[index].append(args[0].detach().clone())

        return hook

    handles = [stack[index].register_forward_pre_hook(recorder(index)) for index in seen]
    prune_sequential(stack, inputs, sparsity=0.7, progress=False)
    for handle in handles:
        handle.remove()
    stack.eval()
    dense.eval()
    with torch.no_grad():
        expected_1 = stack[0](inputs[0])
        expected_2 = stack[1](expected_1)
        dense_1 = dense[0](inputs[0])
    # The first call of block k's forward during calibration gets batch 0 through the pruned blocks.
    assert torch.equal(seen[1][0], expected_1)
    assert torch.equal(seen[2][0], expected_2)
    assert not torch.allclose(seen[1][0], dense_1)


def test_device_and_offload_give_the_same_result() -> None:
    stack = make_stack()
    other = copy.deepcopy(stack)
    inputs = make_inputs()
    prune_sequential(stack, inputs, sparsity=0.5, progress=False)
    report = prune_sequential(
        list(other), inputs, sparsity=0.5, device="cpu", offload_activations=True, atomic=False, progress=False
    )
    assert_same_state(stack, other)
    assert all(parameter.device.type == "cpu" for parameter in other.parameters())
    assert report.activation_bytes == sum(batch.numel() * 4 for batch in inputs)


class Failing(nn.Module):
    """Runs like an MLP block but raises on its forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH + 1, WIDTH)  # wrong input size: the matmul fails

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_failure_in_a_later_block_restores_every_block() -> None:
    stack = make_stack(blocks=2)
    stack.append(Failing())
    original = copy.deepcopy(stack)
    with pytest.raises(RuntimeError):
        prune_sequential(stack, make_inputs(), sparsity=0.5, progress=False)
    assert_same_state(stack, original)
    assert not get_masks(stack)
    assert stack[0].fc1.bias is None  # the bias compensation had added one
    x = make_inputs()[0][..., :WIDTH]
    stack.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(stack[:2](x), original[:2](x))


def test_non_atomic_failure_keeps_earlier_blocks_pruned() -> None:
    stack = make_stack(blocks=2)
    stack.append(Failing())
    with pytest.raises(RuntimeError):
        prune_sequential(stack, make_inputs(), sparsity=0.5, atomic=False, progress=False)
    assert set(get_masks(stack)) == {"0.fc1", "0.fc2", "1.fc1", "1.fc2"}


def test_previously_masked_model_is_restored_after_failure() -> None:
    stack = make_stack(blocks=2)
    prune_sequential(stack, make_inputs(), sparsity=0.3, progress=False)
    stack.append(Failing())
    before = copy.deepcopy(stack)
    with pytest.raises(RuntimeError):
        prune_sequential(stack, make_inputs(), sparsity=0.6, progress=False)
    assert_same_state(stack, before)
    for name, mask in get_masks(stack).items():
        module = stack.get_submodule(name)
        assert torch.equal(module.weight, module.weight_orig * mask)


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        ([], ValueError, "empty"),
        ([torch.ones(2, WIDTH), "text"], TypeError, "batch 1 must be a tensor"),
        (torch.ones(2, WIDTH), TypeError, "single tensor"),
        ([torch.ones(2, TOKENS, WIDTH), torch.full((2, TOKENS, WIDTH), float("nan"))], ValueError, "NaN"),
    ],
)
def test_bad_inputs_leave_the_model_unchanged(inputs: object, error: type, match: str) -> None:
    stack = make_stack()
    original = copy.deepcopy(stack)
    with pytest.raises(error, match=match):
        prune_sequential(stack, inputs, sparsity=0.5, progress=False)  # type: ignore[arg-type]
    assert_same_state(stack, original)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sensitivity="loss"), ValueError, "sensitivity"),
        (dict(method="gradient"), ValueError, "loss gradients"),
        (dict(method="nope"), ValueError, "method"),
        (dict(sparsity=1.5), ValueError, "sparsity"),
        (dict(scope="3:2"), ValueError, "scope"),
        (dict(steps=0), ValueError, "steps"),
        (dict(layers=["fc9"]), ValueError, "fc9"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kwargs: dict, error: type, match: str) -> None:
    stack = make_stack()
    original = copy.deepcopy(stack)
    with pytest.raises(error, match=match):
        prune_sequential(stack, make_inputs(), **{"sparsity": 0.5, "progress": False, **kwargs})
    assert_same_state(stack, original)


def test_bad_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        prune_sequential([], make_inputs(), progress=False)
    with pytest.raises(TypeError, match="sequence of modules"):
        prune_sequential(MLPBlock(WIDTH), make_inputs(), progress=False)
    with pytest.raises(TypeError, match="item 1"):
        prune_sequential([MLPBlock(WIDTH), "block"], make_inputs(), progress=False)  # type: ignore[list-item]


@pytest.mark.parametrize("method", ["ecp", "ecp-obs"])
def test_add_bias_false_keeps_bias_free_layers_without_a_bias(method: str) -> None:
    """As for the Pruner: needed to save architectures that have no bias switch (Mistral, Qwen2)."""
    torch.manual_seed(3)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))])
    inputs = make_inputs()
    compensated = copy.deepcopy(blocks)
    prune_sequential(compensated, inputs, 0.5, method=method, sensitivity="local", progress=False)
    assert any(layer.bias is not None for layer in compensated[0] if isinstance(layer, nn.Linear))
    prune_sequential(blocks, inputs, 0.5, method=method, sensitivity="local", add_bias=False, progress=False)
    assert all(layer.bias is None for layer in blocks[0] if isinstance(layer, nn.Linear))
    with pytest.raises(TypeError, match=r"argument 'add_bias' must be a bool, got str"):
        prune_sequential(blocks, inputs, 0.5, add_bias="no", progress=False)
