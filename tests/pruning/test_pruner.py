"""The pruner: exact sparsity patterns, compensation, masks, iterative steps and untouched models on error."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from nets import tanh_mlp

from ecp_fast.pruning.importance import IMPORTANCES, Importance, register_importance
from ecp_fast.pruning.masks import has_pruning_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(sizes=(12, 16, 8, 4), seed=0, bias=True, dtype=torch.float32) -> nn.Sequential:
    """The pruner tests' default network: a float32 tanh MLP."""
    return tanh_mlp(sizes, seed=seed, bias=bias, dtype=dtype)


def data(samples=96, features=12, classes=4, seed=0, batch=32, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator, dtype=dtype)
    y = torch.randint(0, classes, (samples,), generator=generator)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys changed"
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert not has_pruning_hooks(model)
    assert all(len(m._forward_hooks) == 0 and len(m._backward_hooks) == 0 for m in model.modules())


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: mask.bool() for name, mask in ecp_fast.get_masks(model).items()}


# ---- sparsity patterns ---------------------------------------------------------------------------


def test_global_scope_reaches_the_exact_count_and_removes_the_smallest():
    model = mlp()
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(data())
    scores = {name: imp.score.clone() for name, imp in pruner.importances("ecp").items()}
    report = pruner.prune(0.7, method="ecp", scope="global")
    total = sum(s.numel() for s in scores.values())
    assert report.total_pruned == round(0.7 * total)
    masks = masks_of(model)
    removed = torch.cat([scores[n][~masks[n]] for n in scores])
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    assert removed.max() <= kept.min()


def test_layer_row_and_n_m_scopes_are_exact():
    for scope in ("layer", "row", "2:4", "1:3"):
        model = mlp(sizes=(12, 24, 12, 6))
        pruner = ecp_fast.Pruner(model, progress=False)
        pruner.calibrate(data())
        sparsity = None if ":" in scope else 0.6
        report = pruner.prune(sparsity, method="ecp", scope=scope)
        for name, mask in masks_of(model).items():
            out_features, in_features = mask.shape
            zeros = (~mask).sum()
            if scope == "layer":
                assert zeros == round(0.6 * mask.numel())
            elif scope == "row":
                assert ((~mask).sum(dim=1) == round(0.6 * in_features)).all()
            else:
                n, m = (int(v) for v in scope.split(":"))
                groups = mask.reshape(out_features, in_features // m, m)
                assert (groups.sum(dim=-1) == n).all(), f"{scope} pattern broken in {name}"
        if ":" in scope:
            n, m = (int(v) for v in scope.split(":"))
            assert report.sparsity == pytest.approx(1 - n / m)


def test_every_method_prunes_with_every_scope():
    for method in sorted(IMPORTANCES):
        for scope in ("global", "layer", "row", "2:4"):
            model = mlp(sizes=(8, 8, 4))
            pruner = ecp_fast.Pruner(model, progress=False)
            pruner.calibrate(data(features=8, samples=40), loss_fn=nn.CrossEntropyLoss())
            report = pruner.prune(None if scope == "2:4" else 0.5, method=method, scope=scope)
            assert report.sparsity == pytest.approx(0.5), (method, scope)
            compensated = sum(layer.bias_change_l1 for layer in report.layers) > 0
            assert compensated == IMPORTANCES[method].compensates, (method, scope)


def test_steps_reach_the_target_and_pruned_weights_stay_pruned():
    model = mlp()
    batches = data()
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(batches)
    first = pruner.prune(0.5)
    first_masks = masks_of(model)
    report = pruner.prune(0.9, steps=4)
    assert report.sparsity == pytest.approx(0.9, abs=1 / report.total_weights)
    for name, mask in masks_of(model).items():
        assert not (mask & ~first_masks[name]).any(), "a pruned weight came back"
        assert torch.all(dict(model.named_children())[name].weight[~mask] == 0)
    assert first.sparsity == pytest.approx(0.5, abs=1e-2)
    # The schedule is geometric in the remaining density: 0.5 -> 0.1 over 4 steps.
    assert report.steps == 4


def test_steps_prune_less_at_once_than_one_shot():
    # Iterative pruning recalibrates on the pruned network, so its choice differs from one shot.
    one_shot, iterative = mlp(), mlp()
    for model, steps in ((one_shot, 1), (iterative, 5)):
        pruner = ecp_fast.Pruner(model, progress=False)
        pruner.calibrate(data())
        pruner.prune(0.9, steps=steps)
    assert any(
        not torch.equal(a, b) for a, b in zip(masks_of(one_shot).values(), masks_of(iterative).values(), strict=True)
    )


# ---- compensation --------------------------------------------------------------------------------


def test_compensation_keeps_the_mean_output_of_a_linear_layer():
    # A lone Linear layer is its own output: c = 1 and first order is exact, so after pruning with
    # compensation the layer's mean output over the calibration data is unchanged.
    torch.manual_seed(0)
    layer = nn.Linear(10, 6).double()
    x = torch.randn(200, 10, dtype=torch.float64) * 0.5 + torch.linspace(-2, 3, 10, dtype=torch.float64)
    dense_mean = layer(x).mean(dim=0).detach()
    dense = copy.deepcopy(layer)
    pruner = ecp_fast.Pruner(layer, progress=False)
    pruner.calibrate([x[:77], x[77:]])
    importance = pruner.importances("ecp")[""]
    report = pruner.prune(0.6, method="ecp", scope="row")
    torch.testing.assert_close(layer(x).mean(dim=0).detach(), dense_mean)
    # The remaining error is exactly the quadratic of docs/method.md, with the interactions of a row.
    mask = layer.weight_mask.bool()
    removed_weight = torch.where(mask, 0.0, dense.weight.detach())
    change = layer(x).detach() - dense(x).detach()
    centred = x - x.mean(dim=0)
    torch.testing.assert_close(change, -(centred @ removed_weight.T))
    # With one removed weight per row, the error is the sum of the importances.
    assert report.total_pruned == 36 and report.layers[0].bias_change_l1 > 0
    one = copy.deepcopy(dense)
    pruner = ecp_fast.Pruner(one, progress=False)
    pruner.calibrate([x])
    pruner.prune(0.1, method="ecp", scope="row")  # round(0.1 * 10) = 1 weight per row
    removed = ~one.weight_mask.bool()
    error = (one(x) - dense(x)).square().sum().detach()
    torch.testing.assert_close(error, importance.score[removed].sum())


def test_compensation_matches_the_first_order_prediction_inside_a_network():
    torch.manual_seed(3)
    model = mlp(sizes=(6, 10, 3), dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.mul_(0.3)
    x = torch.randn(300, 6, dtype=torch.float64) + 1.5  # inputs with a large mean: compensation matters
    dense = copy.deepcopy(model)
    pruner = ecp_fast.Pruner(model, layers=["0"], progress=False)
    pruner.calibrate([x])
    ecp = pruner.importances("ecp")["0"]
    obd = pruner.importances("obd")["0"].score
    # Remove one chosen weight (the median ECP importance) through the pruner's own apply path.
    target = ecp.score.flatten().argsort()[ecp.score.numel() // 2]
    forced = torch.ones_like(ecp.score).flatten()
    forced[target] = 0.0
    chosen = {"0": Importance(forced.reshape(ecp.score.shape), ecp.bias_delta)}
    pruner.prune(1 / 60, method="ecp", importances=chosen)
    removed = ~model[0].weight_mask.bool()
    assert removed.sum() == 1 and removed.flatten()[target]
    measured = (model(x) - dense(x)).square().sum().detach()
    assert measured == pytest.approx(float(ecp.score[removed]), rel=0.1)
    assert model[0].bias[removed.any(dim=1)] != dense[0].bias[removed.any(dim=1)]
    # ... and the same weight without compensation costs what OBD predicts, far more.
    plain = copy.deepcopy(dense)
    with torch.no_grad():
        plain[0].weight[removed] = 0
    uncompensated = (plain(x) - dense(x)).square().sum().detach()
    assert uncompensated == pytest.approx(float(obd[removed]), rel=0.1)
    assert measured < 0.5 * uncompensated


def test_a_layer_without_bias_gets_one_and_the_report_says_so():
    model = mlp(bias=False)
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(data())
    report = pruner.prune(0.5)
    assert set(report.added_biases) == {"0", "2", "4"}
    assert all(isinstance(model[i].bias, nn.Parameter) for i in (0, 2, 4))
    assert "yes" in str(report)
    # Methods without compensation add nothing.
    plain = mlp(bias=False)
    report = ecp_fast.prune(plain, None, sparsity=0.5, method="magnitude", progress=False)
    assert report.added_biases == [] and plain[0].bias is None


def test_report_table_lists_every_layer():
    model = mlp()
    report = ecp_fast.prune(model, data(), sparsity=0.8, progress=False)
    text = str(report)
    for name in ("0", "2", "4", "total", "sparsity", "sum|db|"):
        assert name in text
    assert len(report.to_rows()) == 3
    assert report.sparsity == pytest.approx(0.8, abs=1e-2)


# ---- layer kinds and criteria --------------------------------------------------------------------


def test_conv_and_linear_model_prunes_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    )
    images = torch.randn(20, 1, 8, 8)
    report = ecp_fast.prune(model, [images[:10], images[10:]], sparsity=0.5, scope="layer", progress=False)
    assert [layer.kind for layer in report.layers] == ["conv2d", "conv2d", "linear"]
    for layer in report.layers:
        assert layer.pruned == round(0.5 * layer.weights)
    assert model[0].weight_mask.shape == (4, 1, 3, 3)
    assert torch.all(model[0].weight[model[0].weight_mask == 0] == 0)


def test_token_inputs_loss_and_local_criteria():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))
    tokens = torch.randn(4, 7, 6)  # (batch, tokens, features): 35 outputs per sample -> probes
    ecp_fast.prune(model, [tokens], sparsity=0.5, progress=False)
    assert ecp_fast.Pruner(model).probes is None
    for sensitivity in ("loss", "local"):
        net = mlp()
        report = ecp_fast.prune(
            net, data(), sparsity=0.6, sensitivity=sensitivity, loss_fn=nn.CrossEntropyLoss(), progress=False
        )
        assert report.sensitivity == sensitivity and report.sparsity == pytest.approx(0.6, abs=1e-2)


def test_nonlinear_method_prunes_a_small_model():
    model = mlp(sizes=(5, 6, 3))
    report = ecp_fast.prune(model, [torch.randn(30, 5)], sparsity=0.5, method="nonlinear", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.03) and report.layers[0].bias_change_l1 > 0


# ---- masks, fine-tuning, saving ------------------------------------------------------------------


def test_masks_survive_fine_tuning_and_remove_makes_them_permanent():
    model = mlp()
    batches = data()
    ecp_fast.prune(model, batches, sparsity=0.8, progress=False)
    masks = masks_of(model)
    before = {name: dict(model.named_children())[name].weight.detach().clone() for name in masks}
    losses = ecp_fast.training.finetune(model, batches, nn.CrossEntropyLoss(), epochs=2, lr=1e-2, progress=False)
    assert len(losses) == 2 * len(batches)
    for name, mask in masks_of(model).items():
        weight = dict(model.named_children())[name].weight
        assert torch.equal(mask, masks[name])
        assert torch.all(weight[~mask] == 0)
        assert not torch.equal(weight, before[name]), "fine-tuning changed nothing"
    ecp_fast.remove_masks(model)
    assert not has_pruning_hooks(model) and "0.weight_mask" not in model.state_dict()
    assert torch.all(model[0].weight[~masks["0"]] == 0)


def test_state_dict_round_trip_with_masks_and_added_biases():
    model = mlp(bias=False)
    ecp_fast.prune(model, data(), sparsity=0.75, progress=False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    fresh = mlp(bias=False, seed=5)
    masked = ecp_fast.apply_masks_from_state_dict(fresh, state)
    assert masked == ["0", "2", "4"]
    fresh.load_state_dict(state)
    x = torch.randn(7, 12)
    torch.testing.assert_close(fresh(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(masks_of(fresh).values(), masks_of(model).values(), strict=True))
    # The loaded model keeps its zeros while training.
    ecp_fast.training.finetune(fresh, data(), nn.CrossEntropyLoss(), steps=3, progress=False)
    assert torch.all(fresh[0].weight[~masks_of(fresh)["0"]] == 0)


# ---- bad input leaves the model exactly as it was ------------------------------------------------


BAD_PRUNE_CALLS = {
    "sparsity 1.0": dict(sparsity=1.0),
    "sparsity negative": dict(sparsity=-0.1),
    "sparsity nan": dict(sparsity=float("nan")),
    "unknown method": dict(method="nope"),
    "unknown scope": dict(scope="everywhere"),
    "bad N:M": dict(scope="4:2"),
    "bad N:M text": dict(scope="2:x"),
    "N:M with other sparsity": dict(sparsity=0.9, scope="2:4"),
    "N:M not dividing inputs": dict(scope="1:5", sparsity=None),
    "steps zero": dict(steps=0),
}


@pytest.mark.parametrize("kwargs", list(BAD_PRUNE_CALLS.values()), ids=list(BAD_PRUNE_CALLS))
def test_bad_prune_arguments_leave_the_model_untouched(kwargs):
    model = mlp()
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(data())
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        pruner.prune(**{"sparsity": 0.5, **kwargs})
    argument = next(iter(kwargs))
    assert f"'{argument}'" in str(error.value)
    assert_untouched(model, before)


def test_other_bad_inputs_leave_the_model_untouched():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="calibrate"):
        ecp_fast.Pruner(model, progress=False).prune(0.5)
    with pytest.raises(ValueError, match="no module named 'missing'"):
        ecp_fast.Pruner(model, layers=["missing"])
    with pytest.raises(ValueError, match="Tanh is not supported"):
        ecp_fast.Pruner(model, layers=["1"])
    with pytest.raises(ValueError, match="empty"):
        ecp_fast.prune(model, [], sparsity=0.5, progress=False)
    nan_batch = torch.randn(8, 12)
    nan_batch[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ecp_fast.prune(model, [nan_batch], sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="'sensitivity'"):
        ecp_fast.Pruner(model, sensitivity="hessian")
    with pytest.raises(ValueError, match="'loss_fn'"):
        ecp_fast.prune(model, data(), sensitivity="loss", progress=False)
    for method in ("gradient", "taylor"):  # named before a calibration pass runs for nothing
        with pytest.raises(ValueError, match=rf"argument 'loss_fn': method '{method}' needs loss gradients"):
            ecp_fast.prune(model, [torch.randn(8, 12)], method=method, progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        ecp_fast.prune(model, iter(data()), sparsity=0.5, steps=3, progress=False)
    big = nn.Sequential(nn.Linear(200, 120), nn.ReLU(), nn.Linear(120, 2))
    big_before = snapshot(big)
    with pytest.raises(ValueError, match="'nonlinear'.*at most"):
        ecp_fast.prune(big, [torch.randn(4, 200)], method="nonlinear", progress=False)
    assert_untouched(big, big_before)
    assert_untouched(model, before)


def test_gradient_that_turns_nan_leaves_the_model_untouched():
    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.sqrt(self.fc(x) - 100.0)  # NaN output and gradients

    model = Exploding()
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ecp_fast.prune(model, [torch.randn(5, 4)], sparsity=0.5, progress=False)
    assert_untouched(model, before)


def test_failure_in_a_later_step_restores_everything():
    calls = {"count": 0}

    @register_importance("fails_on_third_call_for_test", compensates=True, needs_calibration=True)
    def fails(context) -> Importance:
        calls["count"] += 1
        if calls["count"] > 3 * 2:  # three layers per step: fail during the third step
            raise RuntimeError("scoring failed")
        return IMPORTANCES["ecp"].function(context)

    try:
        model = mlp(bias=False)
        pruner = ecp_fast.Pruner(model, progress=False)
        pruner.calibrate(data())
        before = snapshot(model)
        statistics = pruner.statistics
        with pytest.raises(RuntimeError, match="scoring failed"):
            pruner.prune(0.9, method="fails_on_third_call_for_test", steps=4)
        assert_untouched(model, before)
        assert all(model[i].bias is None for i in (0, 2, 4))
        assert pruner.statistics is statistics
    finally:
        del IMPORTANCES["fails_on_third_call_for_test"]


def test_pruning_an_already_masked_model_combines_the_masks():
    model = mlp()
    torch_prune.random_unstructured(model[0], "weight", amount=0.3)
    existing = model[0].weight_mask.bool().clone()
    report = ecp_fast.prune(model, data(), sparsity=0.6, progress=False)
    assert not (model[0].weight_mask.bool() & ~existing).any()
    assert report.sparsity == pytest.approx(0.6, abs=1e-2)


def test_neuron_scope_shrinks_the_model():
    """scope='neuron' delegates to structured pruning: hidden units go, the model shrinks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    batches = [torch.randn(64, 6) for _ in range(3)]
    pruner = ecp_fast.Pruner(model, sensitivity="output", progress=False)
    pruner.calibrate(batches)
    report = pruner.prune(0.5, method="ecp", scope="neuron")
    assert isinstance(report, ecp_fast.StructuredReport)
    pruned = report.model
    assert pruned[0].out_features == 8 and pruned[2].in_features == 8
    assert pruned(torch.randn(5, 6)).shape == (5, 3)


def test_neuron_scope_refuses_steps_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = ecp_fast.Pruner(model, sensitivity="output", progress=False)
    pruner.calibrate([torch.randn(32, 6)])
    with pytest.raises(ValueError, match="scope='neuron' prunes in one step"):
        pruner.prune(0.5, method="ecp", scope="neuron", steps=3)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_layer_that_loses_every_weight_is_warned_about_and_a_partial_one_is_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # far below every first-layer weight: a global ranking takes it all
    with pytest.warns(UserWarning, match=r"layers \['2'\] lost every weight"):
        report = ecp_fast.prune(copy.deepcopy(model), None, sparsity=0.5, method="magnitude", progress=False)
    assert {layer.name: layer.sparsity for layer in report.layers}["2"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ecp_fast.prune(model, None, sparsity=0.5, method="magnitude", scope="layer", progress=False)


@pytest.mark.parametrize("method", ["ecp", "sparsegpt", "ecp-obs"])
def test_an_n_m_pattern_that_does_not_tile_a_layer_is_refused_by_scope_for_every_method(method):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))  # the conv: 27 inputs
    batches = [(torch.randn(6, 3, 6, 6), torch.randint(0, 2, (6,)))]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"argument 'scope': pattern 2:4 needs the input size of layer '0'"):
        ecp_fast.prune(model, batches, method=method, scope="2:4", progress=False)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    assert not has_pruning_hooks(model)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"method": "ecp", "reconstruct": True}, "argument 'reconstruct': scope='neuron'"),
        ({"method": "ecp-obs"}, "argument 'method': scope='neuron'"),
        ({"method": "ecp", "sparsity": 1.0}, r"argument 'sparsity' \(with scope='neuron'"),
    ],
)
def test_a_neuron_scope_request_it_cannot_serve_names_the_argument(arguments, named):
    model = tanh_mlp()
    before = copy.deepcopy(model.state_dict())
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([(torch.randn(32, 7, dtype=torch.float64), torch.randint(0, 3, (32,)))])
    with pytest.raises(ValueError, match=named):
        pruner.prune(scope="neuron", **arguments)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_reconstruct_must_be_a_bool_and_allocation_needs_a_reconstruction():
    model = tanh_mlp()
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(16, 7, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    with pytest.raises(TypeError, match=r"argument 'reconstruct' must be True or False, got 'no'"):
        ecp_fast.prune(model, batches, sparsity=0.5, method="ecp", reconstruct="no", progress=False)
    for allocation in ("search", "nope"):
        with pytest.raises(
            ValueError, match=rf"argument 'allocation' .* got allocation='{allocation}' with method='ecp'"
        ):
            ecp_fast.prune(model, batches, sparsity=0.5, method="ecp", allocation=allocation, progress=False)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    report = ecp_fast.prune(
        model, batches, sparsity=0.5, method="ecp", reconstruct=True, allocation="uniform", progress=False
    )
    assert report.allocation == "uniform"


@pytest.mark.parametrize("method,reconstruct", [("sparsegpt", False), ("magnitude", True), ("ecp-obs", False)])
def test_one_call_reconstruction_takes_a_one_shot_iterator_as_it_takes_a_list(method, reconstruct):
    """The layers run the batches again: prune() lists a generator for every reconstructive path (sparsegpt
    and reconstruct=True calibrated, then refused it, naming calibrate())."""
    from_list, from_generator = mlp(), mlp()
    ecp_fast.prune(from_list, data(), sparsity=0.5, method=method, reconstruct=reconstruct, progress=False)
    batches = (batch for batch in data())
    ecp_fast.prune(from_generator, batches, sparsity=0.5, method=method, reconstruct=reconstruct, progress=False)
    for a, b in zip(from_list.state_dict().values(), from_generator.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "method,reconstruct", [("ecp", False), ("wanda", False), ("sparsegpt", False), ("magnitude", True)]
)
def test_no_batches_for_a_method_that_needs_them_names_the_argument(method, reconstruct):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"argument 'batches': method '{method}' needs calibration batches, got None"):
        ecp_fast.prune(model, None, sparsity=0.5, method=method, reconstruct=reconstruct, progress=False)
    assert_untouched(model, before)
    ecp_fast.prune(model, None, sparsity=0.5, method="magnitude", progress=False)  # needs no data


def three_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).eval()


def neuron_data():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=generator), torch.randint(0, 5, (32,), generator=generator))] * 2


@pytest.mark.parametrize("chosen", [{"exclude": ["0"]}, {"layers": ["2", "4"]}])
def test_neuron_scope_leaves_the_layers_the_pruner_does_not_prune(chosen):
    """A hidden layer shrinks only where its producer (whose outputs go) is one of the pruner's layers."""
    model = three_layers()
    first = {key: value.clone() for key, value in model[0].state_dict().items()}
    report = ecp_fast.prune(model, neuron_data(), sparsity=0.5, scope="neuron", progress=False, **chosen)
    assert [(pair.producer, pair.consumer) for pair in report.pairs] == [("2", "4")]
    assert model[0].out_features == 16 and model[2].in_features == 16 and model[2].out_features == 6
    assert all(torch.equal(value, model[0].state_dict()[key]) for key, value in first.items())
    assert model(torch.randn(3, 8)).shape == (3, 5)


def test_neuron_scope_with_no_pruned_producer_names_the_pruner_layers_and_changes_nothing():
    model = three_layers()
    before = snapshot(model)
    pruner = ecp_fast.Pruner(model, exclude=["0", "2"], progress=False)
    pruner.calibrate(neuron_data())
    with pytest.raises(ValueError, match=r"arguments 'layers' / 'exclude' \(of the Pruner\).*got layers \['4'\]"):
        pruner.prune(0.5, scope="neuron")
    assert_untouched(model, before)


@pytest.mark.parametrize("sparsity", [np.float32(0.5), np.float64(0.5)])
def test_neuron_scope_takes_numpy_sparsities(sparsity):
    model, reference = three_layers(), three_layers()
    for subject in (model, reference):
        pruner = ecp_fast.Pruner(subject, progress=False)
        pruner.calibrate(neuron_data())
        report = pruner.prune(sparsity if subject is model else float(sparsity), scope="neuron")
        assert report.ratio == 0.5
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match=r"argument 'sparsity' \(with scope='neuron'"):
        pruner.prune(np.bool_(False), scope="neuron")


def test_loss_reduction_of_one_calibration_does_not_carry_into_the_next():
    """loss_reduction=None reads loss_fn.reduction (default mean) in every call."""
    model = mlp()
    batches = data()

    def summed(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="sum")

    pruner = ecp_fast.Pruner(model, sensitivity="loss", progress=False)
    pruner.calibrate(batches, loss_fn=summed, loss_reduction="sum")
    again = pruner.calibrate(batches, loss_fn=nn.functional.cross_entropy)
    fresh = ecp_fast.Pruner(model, sensitivity="loss", progress=False).calibrate(
        batches, loss_fn=nn.functional.cross_entropy
    )
    for name, expected in fresh.statistics.items():
        for got, want in zip(again.statistics[name].moments, expected.moments, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arguments", [{"method": "ecp-obs"}, {"method": "ecp", "reconstruct": True}])
def test_importances_given_to_a_reconstructive_prune_are_named(arguments):
    model = mlp()
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(data())
    importances = pruner.importances("ecp")
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"^argument 'importances': reconstructive pruning .* expected importances=None"
    ):
        pruner.prune(0.5, importances=importances, **arguments)
    with pytest.raises(ValueError, match=r"^argument 'steps': reconstructive pruning .* got steps=2"):
        pruner.prune(0.5, steps=2, **arguments)
    assert_untouched(model, before)


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_steps_on_a_model_sparser_than_the_target_prune_as_one_step(scope):
    """The intermediate steps took the model's overall sparsity as their target, which per layer or row
    pruned every layer below it: more was removed than steps=1 removes (nothing, where every layer is
    past the target)."""
    models = {steps: mlp() for steps in (1, 3)}
    for model in models.values():
        with torch.no_grad():
            model[-1].weight.mul_(100)  # a global ranking takes its zeros from the earlier layers
        ecp_fast.prune(model, None, sparsity=0.5, method="magnitude", progress=False)
    for steps, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ecp_fast.prune(model, None, sparsity=0.2, method="magnitude", scope=scope, steps=steps, progress=False)
    for a, b in zip(models[1].state_dict().values(), models[3].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_target_beyond_what_reconstruction_leaves_is_warned_about():
    model = mlp()
    with pytest.warns(UserWarning, match=r"at most 0.995 sparse .* sparsity 0.999 is not reached"):
        report = ecp_fast.prune(model, data(), sparsity=0.999, method="sparsegpt", scope="layer", progress=False)
    assert report.sparsity < 0.999


def test_an_unknown_method_or_divergence_is_named_with_every_choice():
    model = mlp()
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(data())
    with pytest.raises(ValueError, match=r"argument 'method' must be one of \[.*'wanda', 'ecp-obs', 'sparsegpt'\]"):
        pruner.prune(0.5, method="nope")
    with pytest.raises(ValueError, match=r"argument 'divergence' must be one of \('auto', 'kl', 'mse'\), got 'zzz'"):
        pruner.prune(0.5, method="ecp", divergence="zzz")  # refused even where nothing is reconstructed
    with pytest.raises(ValueError, match=r"argument 'divergence'"):
        ecp_fast.prune(mlp(), data(), 0.5, method="ecp", divergence="zzz", progress=False)
    report = pruner.prune(0.5, method="norm", scope="neuron")  # the neuron scope's own methods
    assert report.parameters_after < report.parameters_before
