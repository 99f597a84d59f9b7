"""Calibration streams the same statistics the reference computes on all the data at once."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from nets import tanh_mlp

from ecp_fast.ops import reference
from ecp_fast.ops.merge import Moments
from ecp_fast.pruning import calibration
from ecp_fast.pruning.calibration import (
    MAX_STORED_SAMPLES,
    Calibrator,
    LayerStatistics,
    merge_statistics,
    resolve_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))


def assert_moments_close(actual: Moments, expected: tuple, rtol=1e-7, atol=1e-9) -> None:
    for name, a, e in zip(("s0", "mean", "m2"), actual, expected, strict=True):
        torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_streamed_moments_equal_reference_on_concatenated_data():
    model = tanh_mlp()
    x = torch.randn(101, 7, dtype=torch.float64)
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(split(x, [1, 13, 31, 7, 49]))
    expected = reference.sensitivities(model, x)
    assert set(pruner.statistics) == set(expected) == {"0", "2", "4"}
    for name, layer in expected.items():
        assert_moments_close(pruner.statistics[name].moments, reference.moments(layer.x, layer.g))
        assert pruner.statistics[name].samples == 101


def test_batched_jacobian_rows_equal_reference_sensitivities():
    model = tanh_mlp()
    x = torch.randn(17, 7, dtype=torch.float64)
    calibrator = Calibrator(model, resolve_layers(model), sensitivity="output")
    gradients = calibrator.gradients(x)
    expected = reference.sensitivities(model, x)
    for name, layer in expected.items():
        torch.testing.assert_close(gradients[name].x, layer.x)
        torch.testing.assert_close(gradients[name].g, layer.g)  # (outputs, N, out), row k = dy_k/dz


def test_linear_with_token_dimension_treats_tokens_as_samples():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)  # (batch, tokens, in): 3 x 2 = 6 outputs per sample
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([x[:3], x[3:]])
    expected = reference.sensitivities(model, x)
    for name, layer in expected.items():
        assert layer.x.shape[0] == 12
        assert_moments_close(pruner.statistics[name].moments, reference.moments(layer.x, layer.g))


def test_rademacher_probes_estimate_the_exact_sensitivity():
    model = tanh_mlp(sizes=(5, 8, 6))
    x = torch.randn(40, 5, dtype=torch.float64)
    exact = ecp_fast.Pruner(model, progress=False)
    exact.calibrate([x])
    estimates = []
    for seed in range(4):
        probed = ecp_fast.Pruner(model, probes=500, seed=seed, progress=False)
        probed.calibrate([x])
        estimates.append(probed.statistics["0"].moments.s0)
    s0_exact = exact.statistics["0"].moments.s0
    s0_estimate = torch.stack(estimates).mean(dim=0)
    # 2000 probes in all: the relative standard error of sum_s c is a few percent at most.
    torch.testing.assert_close(s0_estimate, s0_exact, rtol=0.05, atol=0.0)
    # The estimate differs from the exact value (it is an estimate, not the exact rows again).
    assert not torch.allclose(estimates[0], s0_exact, rtol=1e-6)


def test_many_outputs_switch_to_probes():
    model = nn.Linear(4, 40).double()  # 40 outputs > 32: probes by default
    x = torch.randn(9, 4, dtype=torch.float64)
    gradients = Calibrator(model, resolve_layers(model)).gradients(x)
    name = next(iter(gradients))  # the model itself is the one layer
    assert gradients[name].g.shape == (16, 9, 40)
    # Each probe row of the last layer is +-1/sqrt(P): c = sum_p g_p^2 = 1 exactly.
    torch.testing.assert_close(gradients[name].g.square().sum(0), torch.ones(9, 40, dtype=torch.float64))


def test_conv_unfolding_equals_explicit_loop():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2)).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2).double())
    images = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    model(images)  # materialise the lazy layer
    calibrator = Calibrator(model, resolve_layers(model, ["0"]), sensitivity="output")
    gradients = calibrator.gradients(images)["0"]

    # Explicit: every (image, output position) is a sample; its patch is the padded input window.
    output = conv(images)
    _, _, out_h, out_w = output.shape
    padded = F.pad(images, (1, 1, 1, 1))
    patches, grads = [], []
    z = conv(images)
    z_leaf = z.detach().requires_grad_(True)
    rest = nn.Sequential(*list(model)[1:])
    y = rest(z_leaf)
    rows = [torch.autograd.grad(y[:, k].sum(), z_leaf, retain_graph=True)[0] for k in range(y.shape[1])]
    for b in range(images.shape[0]):
        for h in range(out_h):
            for w in range(out_w):
                top, left = h * 2, w * 1
                window = padded[b, :, top : top + 3 : 1, left : left + 2 * 2 - 1 : 2]
                patches.append(window.reshape(-1))
                grads.append(torch.stack([row[b, :, h, w] for row in rows]))
    explicit_x = torch.stack(patches)
    explicit_g = torch.stack(grads, dim=1)  # (outputs, N, out)
    torch.testing.assert_close(gradients.x, explicit_x)
    torch.testing.assert_close(gradients.g, explicit_g)
    # And the streamed moments are the reference moments of these explicit samples.
    pruner = ecp_fast.Pruner(model, layers=["0"], progress=False)
    pruner.calibrate([images[:1], images[1:]])
    assert_moments_close(pruner.statistics["0"].moments, reference.moments(explicit_x, explicit_g))


def test_loss_sensitivity_rescales_a_mean_loss_to_per_sample_gradients():
    model = tanh_mlp()
    x = torch.randn(30, 7, dtype=torch.float64)
    targets = torch.randint(0, 3, (30,))
    batches = [(x[:10], targets[:10]), (x[10:], targets[10:])]
    mean_loss = ecp_fast.Pruner(model, sensitivity="loss", progress=False)
    mean_loss.calibrate(batches, loss_fn=nn.CrossEntropyLoss())
    sum_loss = ecp_fast.Pruner(model, sensitivity="loss", progress=False)
    sum_loss.calibrate(batches, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    per_sample = ecp_fast.Pruner(model, sensitivity="loss", progress=False)
    per_sample.calibrate(batches, loss_fn=lambda y, t: F.cross_entropy(y, t, reduction="none"))
    for name in ("0", "2", "4"):
        assert_moments_close(mean_loss.statistics[name].moments, sum_loss.statistics[name].moments)
        assert_moments_close(per_sample.statistics[name].moments, sum_loss.statistics[name].moments)
    # The last layer's per-sample loss gradient is softmax - onehot.
    z = model(x).detach()
    g = (torch.softmax(z, dim=1) - F.one_hot(targets, 3)).to(torch.float64)
    s0 = g.square().sum(dim=0)
    torch.testing.assert_close(mean_loss.statistics["4"].moments.s0, s0)


def test_gradient_sums_equal_the_full_batch_loss_gradient():
    model = tanh_mlp()
    x = torch.randn(50, 7, dtype=torch.float64)
    targets = torch.randint(0, 3, (50,))
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([(x[:20], targets[:20]), (x[20:], targets[20:])], loss_fn=nn.CrossEntropyLoss())
    model.zero_grad()
    F.cross_entropy(model(x), targets, reduction="sum").backward()
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(pruner.statistics[name].loss_grad_sum, module.weight.grad)
    # Calibration does not leave gradients on the parameters.
    model.zero_grad(set_to_none=True)
    pruner.calibrate([(x, targets)], loss_fn=nn.CrossEntropyLoss())
    assert all(p.grad is None for p in model.parameters())


def test_local_sensitivity_weights_every_sample_equally():
    model = tanh_mlp()
    x = torch.randn(25, 7, dtype=torch.float64)
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    pruner.calibrate(split(x, [5, 20]))
    stats = pruner.statistics["0"]
    torch.testing.assert_close(stats.moments.s0, torch.full((11,), 25.0, dtype=torch.float64))
    torch.testing.assert_close(stats.moments.mean, x.mean(0).expand(11, 7))
    torch.testing.assert_close(stats.moments.m2, (x - x.mean(0)).square().sum(0).expand(11, 7))
    torch.testing.assert_close(stats.activation_sq_sum, x.square().sum(0))


def test_merge_statistics_of_two_halves_equals_the_whole():
    model = tanh_mlp()
    x = torch.randn(40, 7, dtype=torch.float64)
    targets = torch.randint(0, 3, (40,))
    whole, first, second = (ecp_fast.Pruner(model, progress=False) for _ in range(3))
    whole.calibrate([(x, targets)], loss_fn=nn.CrossEntropyLoss())
    first.calibrate([(x[:15], targets[:15])], loss_fn=nn.CrossEntropyLoss())
    second.calibrate([(x[15:], targets[15:])], loss_fn=nn.CrossEntropyLoss())
    for name in whole.statistics:
        merged: LayerStatistics = merge_statistics(first.statistics[name], second.statistics[name])
        assert_moments_close(merged.moments, whole.statistics[name].moments)
        torch.testing.assert_close(merged.activation_sq_sum, whole.statistics[name].activation_sq_sum)
        torch.testing.assert_close(merged.loss_grad_sum, whole.statistics[name].loss_grad_sum)
        assert merged.samples == 40


def test_calibration_keeps_no_per_sample_data_beyond_the_replay_bound():
    model = tanh_mlp(dtype=torch.float32)
    batches = [torch.randn(256, 7) for _ in range(MAX_STORED_SAMPLES // 256 + 1)]
    pruner = ecp_fast.Pruner(model, progress=False)
    result = pruner.calibrate(batches)
    assert result.inputs is None and not result.inputs_complete
    assert result.samples == 256 * len(batches)
    # Only (out, in) and (in,) sized sums per layer remain.
    for name, stats in pruner.statistics.items():
        assert stats.moments.mean.shape == dict(model.named_children())[name].weight.shape


def test_hooks_removed_and_modes_restored_also_on_error():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([torch.randn(8, 4), torch.randn(5, 4)])
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # batch norm statistics were not updated
        torch.testing.assert_close(value, before[key])
    bad = torch.randn(8, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pruner.calibrate([torch.randn(8, 4), bad])
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert model.training


def test_frozen_parameters_still_calibrate():
    model = tanh_mlp()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(12, 7, dtype=torch.float64)
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([x])
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    expected = reference.sensitivities(model, x)
    for name, layer in expected.items():
        assert_moments_close(pruner.statistics[name].moments, reference.moments(layer.x, layer.g))


def test_empty_data_and_layers_that_never_run_are_errors():
    model = tanh_mlp()
    pruner = ecp_fast.Pruner(model, progress=False)
    with pytest.raises(ValueError, match="empty"):
        pruner.calibrate([])
    with pytest.raises(ValueError, match="never ran"):
        unused = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})

        class Partial(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.blocks = unused

            def forward(self, x):
                return self.blocks["used"](x)

        ecp_fast.Pruner(Partial(), progress=False).calibrate([torch.randn(4, 3)])


def test_unsupported_conv_is_skipped_or_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    assert list(resolve_layers(model)) == ["2"]
    with pytest.raises(ValueError, match="groups=2"):
        resolve_layers(model, ["0"])


# ---- batches as users bring them: dicts, attention masks, model outputs -------------------------------


class TokenMLP(nn.Module):
    """Per-token tanh MLP on (batch, tokens, 5) that takes keyword inputs like a Hugging Face model."""

    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first = nn.Linear(5, 6).double()
        self.second = nn.Linear(6, 2).double()
        self.returns = returns

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, scale: float = 1.0):
        y = self.second(torch.tanh(self.first(x * scale)))
        if self.returns == "tuple":
            return (y, "extra")
        if self.returns == "dict":
            return {"hidden": y.detach() * 0, "logits": y}
        if self.returns == "object":
            return type("Output", (), {"logits": y})()
        return y


def padded_and_real_tokens() -> tuple[dict, torch.Tensor]:
    """Two sequences of 4 tokens, the second padded after 2 with huge garbage; and the 6 real tokens."""
    torch.manual_seed(4)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x[1, 2:] = 1e6  # padding must count for nothing, whatever it holds
    real = x[mask.bool()]  # (6, 5)
    return {"x": x, "attention_mask": mask}, real


def test_dict_batches_are_called_with_keywords():
    model = TokenMLP()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    plain = ecp_fast.Pruner(model, progress=False)
    plain.calibrate([x * 2])
    keyword = ecp_fast.Pruner(model, progress=False)
    result = keyword.calibrate([{"x": x, "scale": 2.0}])
    for name in ("first", "second"):
        assert_moments_close(keyword.statistics[name].moments, plain.statistics[name].moments)
    assert result.samples == 3  # no input_ids or mask: the first dimension
    targets = torch.randn(3, 4, 2, dtype=torch.float64)
    with_targets = ecp_fast.Pruner(model, sensitivity="loss", progress=False)
    with_targets.calibrate([({"x": x}, targets)], loss_fn=nn.MSELoss(reduction="sum"))
    assert with_targets.calibration.has_loss


@pytest.mark.parametrize("sensitivity", ["local", "output", "loss"])
def test_padding_tokens_never_count(sensitivity):
    model = TokenMLP()
    padded, real = padded_and_real_tokens()
    targets = torch.randn(2, 4, 2, dtype=torch.float64)
    real_targets = targets[padded["attention_mask"].bool()]

    def loss_fn(y, t):  # ignores padded positions, as a token loss with ignore_index does
        weights = padded["attention_mask"].to(y.dtype).unsqueeze(-1) if y.dim() == 3 else 1.0
        return ((y - t).square() * weights).sum()

    loss = loss_fn if sensitivity == "loss" else None
    with_padding = ecp_fast.Pruner(model, sensitivity=sensitivity, progress=False)
    result = with_padding.calibrate([(padded, targets) if loss else padded], loss_fn=loss, loss_reduction="sum")
    # The same tokens as six independent samples (tokens do not interact in this model).
    alone = ecp_fast.Pruner(model, sensitivity=sensitivity, progress=False)
    alone.calibrate([({"x": real}, real_targets) if loss else {"x": real}], loss_fn=loss, loss_reduction="sum")
    assert result.samples == 6
    for name in ("first", "second"):
        stats, expected = with_padding.statistics[name], alone.statistics[name]
        assert stats.samples == 6
        assert_moments_close(stats.moments, expected.moments)
        torch.testing.assert_close(stats.activation_sq_sum, expected.activation_sq_sum)
        if loss:
            torch.testing.assert_close(stats.loss_grad_sum, expected.loss_grad_sum)


def test_row_sensitivities_are_the_row_means_of_c_and_zero_on_padding():
    model = TokenMLP()
    padded, _ = padded_and_real_tokens()
    calibrator = Calibrator(model, resolve_layers(model), sensitivity="output")
    rows = calibrator.row_sensitivities(padded)
    gradients = calibrator.gradients(padded)
    weights = padded["attention_mask"].reshape(-1).double()
    for name in ("first", "second"):
        expected = gradients[name].g.square().sum(0).mean(-1) * weights
        torch.testing.assert_close(rows[name], expected)
    local = Calibrator(model, resolve_layers(model), sensitivity="local").row_sensitivities(padded)
    torch.testing.assert_close(local["first"], weights)


@pytest.mark.parametrize("returns", ["tuple", "dict", "object"])
def test_the_output_tensor_is_found_without_output_fn(returns):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = ecp_fast.Pruner(TokenMLP(), probes=4, progress=False)
    expected.calibrate([x])
    found = ecp_fast.Pruner(TokenMLP(returns=returns), probes=4, progress=False)
    found.calibrate([x])
    for name in ("first", "second"):
        assert_moments_close(found.statistics[name].moments, expected.statistics[name].moments)
    # The local sensitivity never looks at the output at all.
    unreadable = nn.Sequential(nn.Linear(5, 3), nn.Flatten(0))
    unreadable.forward = lambda inputs: {"not": "a tensor", "layer": unreadable[0](inputs)}  # type: ignore[assignment]
    ecp_fast.Pruner(unreadable, sensitivity="local", progress=False).calibrate([torch.randn(4, 5)])


def test_calibration_restores_which_parameters_require_grad():
    model = tanh_mlp()
    model[0].weight.requires_grad_(False)
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([torch.randn(5, 7, dtype=torch.float64)])
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * 5


def _statistics(model: nn.Module, batches: list, probes: int | None = None) -> dict[str, LayerStatistics]:
    calibrator = Calibrator(model, resolve_layers(model), sensitivity="output", probes=probes)
    return calibrator.run(batches, progress=False).statistics


@pytest.mark.parametrize("probes", [None, 3])
def test_one_batched_backward_pass_equals_one_pass_per_direction(monkeypatch, probes):
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    token = TokenMLP()
    padded, _ = padded_and_real_tokens()
    cases = [(conv, [torch.randn(6, 2, 5, 5), torch.randn(3, 2, 5, 5)]), (token, [padded, padded])]
    for model, batches in cases:
        batched = _statistics(model, batches, probes)
        monkeypatch.setattr(calibration, "BATCHED_BACKWARD_BYTES", 0)
        streamed = _statistics(model, batches, probes)
        monkeypatch.undo()
        for name, stats in batched.items():  # a batched backward pass may round its products differently
            assert_moments_close(stats.moments, streamed[name].moments, rtol=1e-5, atol=1e-7)


class Scaled(nn.Module):
    """An MLP whose output is multiplied by ``scale``: huge gradients from ordinary inputs."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.scale = nn.Linear(4, 5), nn.Linear(5, 2), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    ("scale", "value", "message", "sensitivities"),
    [
        (1.0, float("inf"), "inputs of layer 'fc1' contain NaN or Inf", ("output", "local")),
        (1.0, float("nan"), "inputs of layer 'fc1' contain NaN or Inf", ("output", "local")),
        (1.0, 1e30, "squared inputs of layer 'fc1' overflowed", ("output", "local")),
        (1e30, 1.0, "output gradients of layer 'fc1' contain NaN or Inf, or values too large to square", ("output",)),
    ],
)
def test_non_finite_or_overflowing_calibration_values_are_named(scale, value, message, sensitivities):
    model = Scaled(scale)
    x = torch.randn(8, 4)
    x[3, 1] = value
    for sensitivity in sensitivities:
        calibrator = Calibrator(model, resolve_layers(model), sensitivity=sensitivity)
        with pytest.raises(ValueError, match=message):
            calibrator.run([torch.randn(8, 4) / scale, x], progress=False)


def test_nan_gradients_are_named_by_the_row_sensitivities_too():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(self.fc(x) - 100.0)  # NaN outputs and gradients

    model = Root()
    with pytest.raises(ValueError, match="output gradients of layer 'fc' contain NaN or Inf"):
        Calibrator(model, resolve_layers(model), sensitivity="output").row_sensitivities(torch.randn(5, 4))


@pytest.mark.parametrize("sensitivity", ["output", "loss"])
def test_batches_split_into_slices_give_the_statistics_of_the_whole(monkeypatch, sensitivity):
    model = TokenMLP()
    torch.manual_seed(5)
    x = torch.randn(7, 4, 5, dtype=torch.float64)
    mask = (torch.rand(7, 4) > 0.3).long()
    targets = torch.randn(7, 4, 2, dtype=torch.float64)
    batches = [({"x": x, "attention_mask": mask}, targets), ({"x": x[:3] * 2, "attention_mask": mask[:3]}, targets[:3])]

    def loss_fn(y, t):
        return (y - t).square().sum()

    def calibrate() -> tuple[dict[str, LayerStatistics], list[int]]:
        seen: list[int] = []
        handle = model.first.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        pruner = ecp_fast.Pruner(model, sensitivity=sensitivity, probes=3, progress=False)  # probes of 8 outputs
        pruner.calibrate(batches, loss_fn=loss_fn, loss_reduction="sum")
        handle.remove()
        return pruner.statistics, seen

    whole, seen_whole = calibrate()
    # Two samples' sensitivities fit: (4 tokens x (6 + 2) outputs x 8 bytes) per sample.
    monkeypatch.setattr(calibration, "SLICE_BYTES", 2 * 4 * 8 * 8)
    sliced, seen_sliced = calibrate()
    assert seen_whole == [2, 1, 7, 3]  # a probe on samples 0:2 and 1:2 per shape of sample, then the batches
    assert seen_sliced == [2, 1, 2, 2, 2, 1, 2, 1]
    for name, stats in whole.items():
        assert sliced[name].samples == stats.samples
        assert_moments_close(sliced[name].moments, stats.moments, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sliced[name].activation_sq_sum, stats.activation_sq_sum)
        torch.testing.assert_close(sliced[name].loss_grad_sum, stats.loss_grad_sum)


def test_inputs_that_cannot_be_split_are_calibrated_whole(monkeypatch):
    model = TokenMLP()
    monkeypatch.setattr(calibration, "SLICE_BYTES", 1)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    seen: list[int] = []
    model.first.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    calibrator = Calibrator(model, resolve_layers(model), sensitivity="loss", loss_fn=lambda y, t: y.square().sum())
    calibrator.run([(x, list(x))], progress=False)  # targets that are not one tensor: kept whole
    calibrator.run([(x, torch.randn(3, 3, 2))], progress=False)  # targets of another length: kept whole
    assert seen == [4, 4]


def test_no_graph_outlives_its_pass_without_the_garbage_collector():
    import gc

    model = TokenMLP()
    calibrator = Calibrator(model, resolve_layers(model), sensitivity="output", probes=2)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    gc.collect()
    before = {id(o) for o in _graph_tensors()}  # graphs an earlier test left behind are not this pass's
    gc.disable()
    try:
        calibrator.run([x, x], progress=False)
        in_graphs = [o for o in _graph_tensors() if id(o) not in before]
    finally:
        gc.enable()
    assert in_graphs == []  # a reference cycle would hold every pass's graph until a collection


@pytest.mark.parametrize("case", ["exact", "probes", "conv", "padded", "loss", "local", "sliced"])
def test_row_sensitivities_kept_by_calibration_are_those_of_a_separate_pass(monkeypatch, case):
    torch.manual_seed(6)
    model: nn.Module = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    batches: list = [torch.randn(11, 6), torch.randn(5, 6)]
    sensitivity, loss_fn = "output", None
    if case == "probes":
        model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 40))
    elif case == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
        batches = [torch.randn(4, 2, 5, 5), torch.randn(2, 2, 5, 5)]
    elif case in ("padded", "sliced"):
        model = TokenMLP()
        padded, _ = padded_and_real_tokens()
        batches = [padded, {"x": padded["x"][:1] * 3, "attention_mask": padded["attention_mask"][:1]}]
    elif case == "loss":
        sensitivity, loss_fn = "loss", nn.CrossEntropyLoss()
        batches = [(x, torch.randint(0, 3, (x.shape[0],))) for x in batches]
    elif case == "local":
        sensitivity = "local"
    if case == "sliced":
        monkeypatch.setattr(calibration, "SLICE_BYTES", 1)  # one sequence per slice
    calibrator = Calibrator(model, resolve_layers(model), sensitivity=sensitivity, loss_fn=loss_fn, probes=None)
    kept = calibrator.run(batches, progress=False, row_sensitivities=True).row_sensitivities
    assert kept is not None and len(kept) == len(batches)
    generator = torch.Generator().manual_seed(0)  # run() seeds its own generator the same way
    for index, batch in enumerate(batches):
        inputs, targets = batch if isinstance(batch, tuple) else (batch, None)
        separate = calibrator.row_sensitivities(inputs, targets, generator, index)
        for name, row in separate.items():
            assert torch.equal(kept[index][name], row), (case, index, name)
    assert Calibrator(model, resolve_layers(model)).run(batches[:1], progress=False).row_sensitivities is None


def test_ecp_obs_reuses_the_kept_row_sensitivities_only_for_the_model_it_calibrated(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    batches = [torch.randn(20, 6) for _ in range(2)]
    separate_passes: list[int] = []
    original = Calibrator.row_sensitivities

    def counted(self, *args, **kwargs):
        separate_passes.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Calibrator, "row_sensitivities", counted)
    one_call = copy.deepcopy(model)
    ecp_fast.prune(one_call, batches, sparsity=0.5, method="ecp-obs", progress=False)
    assert separate_passes == []
    pruner = ecp_fast.Pruner(copy.deepcopy(model), progress=False)
    pruner.calibrate(batches)  # rows not kept: ecp-obs takes its own pass
    pruner.prune(0.5, method="ecp-obs")
    assert len(separate_passes) == len(batches)
    for name, parameter in one_call.named_parameters():  # and both give the same model
        torch.testing.assert_close(parameter, dict(pruner.model.named_parameters())[name], rtol=0, atol=0)
    changed = ecp_fast.Pruner(copy.deepcopy(model), progress=False)
    changed.calibrate(batches, row_sensitivities=True)
    with torch.no_grad():
        changed.model[0].weight.mul_(2)  # the calibrated rows no longer describe this model
    separate_passes.clear()
    changed.prune(0.5, method="ecp-obs")
    assert len(separate_passes) == len(batches)


class SequenceFirst(nn.Module):
    """Causal self-attention over ``(tokens, batch, d)`` inputs: the first dimension is not one of samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.attention = nn.MultiheadAttention(4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = torch.triu(torch.ones(x.shape[0], x.shape[0], dtype=torch.bool), diagonal=1)
        mixed, _ = self.attention(x, x, x, attn_mask=causal, need_weights=False)
        return self.head(torch.relu(mixed))


def test_a_first_dimension_that_is_not_one_of_samples_is_never_sliced(monkeypatch):
    model = SequenceFirst()
    x = torch.randn(6, 2, 4)  # 6 tokens of 2 sequences
    whole = _statistics(model, [x])
    monkeypatch.setattr(calibration, "SLICE_BYTES", 1)
    seen: list[int] = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    kept = _statistics(model, [x])
    assert seen == [2, 1, 6]  # the probe tells that token 1 depends on token 0: calibrated whole
    for name, stats in whole.items():
        for actual, expected in zip(kept[name].moments, stats.moments, strict=True):
            assert torch.equal(actual, expected)


def _graph_tensors() -> list:
    """Every live tensor that is part of an autograd graph (as the garbage collector tracks them)."""
    import gc

    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.grad_fn is not None]
