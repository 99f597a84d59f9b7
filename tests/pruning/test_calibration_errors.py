"""Calibration's errors on bad batches, bad targets, unused layers and inference mode: each names its
argument, the batch and what to do, and leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fingerprint import assert_unchanged, fingerprint
from nets import tanh_mlp
from torch import nn
from torch.nn import functional as F

import ecp_fast
from ecp_fast.pruning.batches import BlockInputs, capture_block_inputs
from ecp_fast.pruning.calibration import Calibrator, resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Sequential:
    """A small MLP in mixed training modes, so that a restored mode is a real check."""
    model = tanh_mlp((6, 8, 5, 3))
    model.train()
    model[1].eval()
    return model


def _data(rows: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (rows,), generator=generator)


class TwoInputs(nn.Module):
    """A network whose forward takes two tensors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8).double()
        self.b = nn.Linear(4, 8).double()
        self.head = nn.Linear(8, 3).double()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x) + self.b(z)))


class WithAuxHead(nn.Module):
    """A network holding a Linear its forward never calls (an auxiliary head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8).double()
        self.head = nn.Linear(8, 3).double()
        self.aux = nn.Linear(8, 5).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x)))


class Raising(nn.Module):
    """Runs a Linear, then raises ``error`` from its forward pass."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 3).double()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layer(x)
        raise self.error


class Twice(nn.Module):
    """Calls its one Linear twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(6, 6).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


# ---- inference mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ecp", "ecp-obs", "magnitude"])
def test_calibration_under_inference_mode_says_it_needs_autograd_and_leaves_the_model(method: str) -> None:
    model, (x, y) = _model(), _data()
    before = fingerprint(model)
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match=r"needs autograd .* cannot run under torch\.inference_mode\(\)"),
    ):
        ecp_fast.prune(model, [(x, y)], 0.5, method=method, progress=False)
    assert_unchanged(before, model)


def test_under_no_grad_calibration_still_runs_and_local_runs_under_inference_mode() -> None:
    model, (x, y) = _model(), _data()
    with torch.no_grad():
        report = ecp_fast.prune(model, [(x, y)], 0.5, method="ecp", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    model = _model()
    calibrator = Calibrator(model, resolve_layers(model), sensitivity="local")
    with torch.inference_mode():  # no backward pass: nothing that inference mode forbids
        result = calibrator.run([(x, y)], progress=False)
    assert result.batches == 1 and set(result.statistics) == {"0", "2", "4"}


# ---- a failing batch names argument 'batches' and the batch ------------------------------------------------


@pytest.mark.parametrize("sensitivity", ["output", "local"])  # the first model call: a slicing probe, or the pass
def test_a_single_batch_not_in_a_list_names_the_batch_and_says_to_put_it_in_a_list(sensitivity: str) -> None:
    model, (x, y) = _model(), _data()
    before = fingerprint(model)
    pattern = (
        r"^argument 'batches': running the model on batch 1 \(inputs: a tensor of shape \(12,\), torch\.int64\) "
        r"raised RuntimeError: .*batches here is a tuple of 2 items, each taken as a batch"
        r".*pass \[\(inputs, targets\)\]"
    )
    with pytest.raises(ValueError, match=pattern) as caught:
        ecp_fast.prune(model, (x, y), 0.5, sensitivity=sensitivity, progress=False)
    assert isinstance(caught.value.__cause__, RuntimeError)  # chained to the model's own error
    assert_unchanged(before, model)


def test_a_batch_the_model_rejects_names_the_batch_its_inputs_and_the_layout_of_batches() -> None:
    model, (x, y) = _model(), _data()
    batches = [(x, y), (x[:, :5], y)]  # batch 1 has a feature too few
    before = fingerprint(model)
    pattern = (
        r"^argument 'batches': running the model on batch 1 \(inputs: a tensor of shape \(12, 5\), torch\.float64\) "
        r"raised RuntimeError: .*; check the batch against the model \(batches is an iterable of batches, each "
        r"\(inputs, targets\) or inputs alone, so a single batch goes in a list: \[\(inputs, targets\)\]\)$"
    )
    with pytest.raises(ValueError, match=pattern):
        ecp_fast.prune(model, batches, 0.5, method="ecp-obs", progress=False)
    assert_unchanged(before, model)


def test_tuple_inputs_say_how_to_pass_several_inputs_and_a_mapping_of_them_works() -> None:
    x, y = _data()
    z = torch.randn(12, 4, dtype=torch.float64)
    model = TwoInputs()
    before = fingerprint(model)
    pattern = (
        r"^argument 'batches': running the model on batch 0 \(inputs: a tuple of 2 items\) raised TypeError: .*"
        r"pass several inputs as a mapping of keyword arguments, such as \{'x': x, 'z': z\}, called as "
        r"model\(\*\*inputs\)"
    )
    with pytest.raises(ValueError, match=pattern):
        ecp_fast.prune(model, [((x, z), y)], 0.5, progress=False)
    assert_unchanged(before, model)
    report = ecp_fast.prune(model, [({"x": x, "z": z}, y)], 0.5, progress=False)  # what the message says to do
    assert {layer.name for layer in report.layers} == {"a", "b", "head"}


def test_targets_that_do_not_fit_the_loss_name_batches_loss_fn_and_both_shapes() -> None:
    model, (x, y) = _model(), _data()
    before = fingerprint(model)
    pattern = (
        r"^argument 'batches': loss_fn\(outputs, targets\) on batch 1 \(outputs: a tensor of shape \(12, 3\), "
        r"torch\.float64; targets: a tensor of shape \(11,\), torch\.int64\) raised ValueError: Expected input "
        r"batch_size \(12\) to match target batch_size \(11\); each batch's targets must fit the model's outputs"
    )
    with pytest.raises(ValueError, match=pattern) as caught:
        ecp_fast.prune(model, [(x, y), (x, y[:11])], 0.5, sensitivity="loss", loss_fn=F.cross_entropy, progress=False)
    assert isinstance(caught.value.__cause__, ValueError)
    assert_unchanged(before, model)


def test_an_output_fn_that_fails_is_named() -> None:
    model, (x, y) = _model(), _data()
    before = fingerprint(model)

    def output_fn(output: torch.Tensor) -> torch.Tensor:
        return output.logits  # the model returns a tensor, not a Hugging Face output

    with pytest.raises(ValueError, match=r"^argument 'output_fn': it raised AttributeError .* for batch 0"):
        ecp_fast.prune(model, [(x, y)], 0.5, output_fn=output_fn, progress=False)
    assert_unchanged(before, model)


def test_capturing_block_inputs_names_the_batch_the_model_rejects() -> None:
    model, (x, _) = _model(), _data()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"^argument 'batches': running the model on batch 1 \(inputs: a tensor"):
        capture_block_inputs(model, model[2], [x, x[:, :5]])
    assert_unchanged(before, model)


# ---- what is not reworded ------------------------------------------------------------------------------


# Factories, not instances: a raised error's traceback holds the pass's frames (and graph), and a
# parameter instance would keep them for the whole session.
@pytest.mark.parametrize(
    "make_error",
    [
        lambda: KeyboardInterrupt(),
        lambda: torch.OutOfMemoryError("out of memory"),
        lambda: ValueError("argument 'x': already clear"),
    ],
    ids=["KeyboardInterrupt", "OutOfMemoryError", "argument error"],
)
def test_interrupts_out_of_memory_and_errors_naming_an_argument_pass_through(
    make_error: Callable[[], BaseException],
) -> None:
    error = make_error()
    model, (x, y) = Raising(error), _data()
    before = fingerprint(model)
    with pytest.raises(type(error)) as caught:
        ecp_fast.prune(model, [(x, y)], 0.5, progress=False)
    assert caught.value is error
    assert_unchanged(before, model)


def test_a_block_failing_on_captured_block_inputs_keeps_its_own_error() -> None:
    block, (x, _) = _model(), _data()
    inputs = BlockInputs(x[:, :5])  # hidden states the library would have fed it: no batch of the user's to blame
    before = fingerprint(block)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as caught:
        Calibrator(block, resolve_layers(block)).run([inputs], progress=False)
    assert caught.value.__cause__ is None
    assert_unchanged(before, block)


def test_the_calibrations_own_errors_inside_the_forward_pass_are_not_wrapped() -> None:
    model, (x, y) = _model(), _data()
    x[3, 2] = float("nan")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"^calibration batch 0: the inputs of layer '0' contain NaN") as caught:
        ecp_fast.prune(model, [(x, y)], 0.5, sensitivity="local", progress=False)
    assert caught.value.__cause__ is None
    assert_unchanged(before, model)

    twice = Twice()
    before = fingerprint(twice)
    with pytest.raises(RuntimeError, match=r"^layer 'layer' ran twice in one forward pass"):
        ecp_fast.prune(twice, [(x.nan_to_num(), y)], 0.5, progress=False)
    assert_unchanged(before, twice)


@pytest.mark.parametrize("case", ["own error", "model error", "loss error"])
def test_a_failed_pass_leaves_no_graph_for_the_garbage_collector(case: str) -> None:
    import gc

    # The layer that runs twice fails in its second call, after its first tapped a graph.
    model, (x, y) = (Twice() if case == "own error" else _model()), _data()
    batches = {"own error": [x], "model error": [x, x[:, :5]], "loss error": [(x, y[:5])]}[case]
    loss_fn = F.cross_entropy if case == "loss error" else None
    calibrator = Calibrator(model, resolve_layers(model), loss_fn=loss_fn)
    gc.collect()
    before = {id(o) for o in _graph_tensors()}  # graphs an earlier test left behind are not this pass's
    gc.disable()
    try:
        with pytest.raises((ValueError, RuntimeError)):
            calibrator.run(batches, progress=False)
        in_graphs = [o for o in _graph_tensors() if id(o) not in before]
    finally:
        gc.enable()
    assert in_graphs == []  # a hook's error kept past the pass would hold its graph in a cycle


# ---- a layer that never runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "ecp", "ecp-obs"])
def test_a_layer_that_never_runs_says_so_and_suggests_exclude(method: str) -> None:
    model, (x, y) = WithAuxHead(), _data()
    before = fingerprint(model)
    pattern = (
        r"^argument 'layers': layers \['aux'\] never ran: the model's forward pass called them on none of the "
        r"calibration batches \(2 seen;.*leave them out with exclude=\['aux'\], or name the layers to prune with "
        r"layers="
    )
    with pytest.raises(ValueError, match=pattern):
        ecp_fast.prune(model, [(x, y), (x, y)], 0.5, method=method, progress=False)
    assert_unchanged(before, model)
    report = ecp_fast.prune(model, [(x, y)], 0.5, method=method, exclude=["aux"], progress=False)
    assert {layer.name for layer in report.layers} == {"a", "head"}


class _Tokens(nn.Module):
    """Token ids and an attention mask in, per-token logits out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(input_ids))))


@pytest.mark.parametrize("method", ["ecp", "ecp-obs", "wanda"])
def test_calibration_with_every_position_masked_out_is_refused_as_empty(method: str) -> None:
    """No real token: every importance would be 0 and the choice of weights arbitrary."""
    model = _Tokens()
    before = fingerprint(model)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"argument 'batches': the calibration data holds no sample"):
        ecp_fast.prune(model, batches, sparsity=0.5, method=method, progress=False)
    assert_unchanged(before, model)
    batches[0]["attention_mask"][0, :2] = 1  # two real tokens are enough
    report = ecp_fast.prune(model, batches, sparsity=0.5, method=method, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.05)


def _graph_tensors() -> list:
    """Every live tensor that is part of an autograd graph (as the garbage collector tracks them)."""
    import gc

    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.grad_fn is not None]


def test_a_single_mapping_as_the_batches_is_named_with_the_fix() -> None:
    """Iterating one mapping gives its keys: it is refused before any batch runs, the model untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"argument 'batches'.*one mapping \(keys \['x'\]\).*\[batch\]"):
        ecp_fast.prune(model, {"x": torch.randn(2, 4)}, 0.5, "ecp", progress=False)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
