"""Reconstructive pruning: sparsegpt, ecp-obs and reconstruct=True, checked against direct solves."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import ecp_fast
from ecp_fast.pruning import allocation, obs, reconstruction
from ecp_fast.pruning.calibration import LayerSpec


def _relu_mlp(sizes=(12, 16, 8, 3), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def _batches(fan_in: int = 12, count: int = 3, size: int = 40, seed: int = 1, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, fan_in, generator=generator, dtype=torch.float64),
            torch.randint(0, classes, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _augmented_inputs(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def test_refit_of_a_later_layer_is_least_squares_to_the_dense_preactivations() -> None:
    """Layer 2 is solved from the pruned layer 0's outputs towards the dense layer 2's outputs."""
    model = _relu_mlp()
    dense = copy.deepcopy(model)
    batches = _batches()
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    pruner.calibrate(batches)
    pruner.prune(0.6, method="magnitude", scope="layer", reconstruct=True, allocation="uniform")
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        pruned_inputs = model[1](model[0](x))  # what layer 2 sees in the pruned model
        target = dense[2](dense[1](dense[0](x)))  # the dense pre-activations of layer 2
    keep = model[2].weight_mask.bool()
    design = _augmented_inputs(pruned_inputs)
    # the ridge is a fraction of the mean diagonal about the inputs' means (the bias: the sample count)
    spread = ((pruned_inputs - pruned_inputs.mean(0)) ** 2).sum(0)
    ridge = 0.01 * float((spread.sum() + len(x)) / (pruned_inputs.shape[1] + 1))
    # Ridge centred on the layer's weights before the refit: layer 2 is masked by magnitude on the
    # dense weights, and only the kept ones (and the bias) move.
    centre = torch.cat([dense[2].weight * keep, dense[2].bias.unsqueeze(1)], 1)
    for row in range(keep.shape[0]):
        support = torch.cat([keep[row], torch.tensor([True])])
        columns = design[:, support]
        # the ridge leaves the bias (last) free: it is taken about the inputs' means
        stacked = torch.cat([columns, ridge**0.5 * torch.eye(int(support.sum()), dtype=torch.float64)[:-1]])
        rhs = torch.cat([target[:, row], ridge**0.5 * centre[row, support][:-1]])
        expected = torch.linalg.lstsq(stacked, rhs.unsqueeze(1)).solution.squeeze(1)
        actual = torch.cat([model[2].weight[row], model[2].bias[row : row + 1]])[support]
        torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9)


def test_refit_never_increases_the_first_layers_preactivation_error() -> None:
    model = _relu_mlp()
    batches = _batches()
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        dense_out = model[0](x)
    masked = copy.deepcopy(model)
    ecp_fast.prune(masked, None, sparsity=0.7, method="magnitude", scope="layer", progress=False)
    refitted = copy.deepcopy(model)
    ecp_fast.prune(
        refitted,
        batches,
        sparsity=0.7,
        method="magnitude",
        scope="layer",
        reconstruct=True,
        allocation="uniform",
        sensitivity="local",
        progress=False,
    )
    assert torch.equal(masked[0].weight_mask, refitted[0].weight_mask)
    with torch.no_grad():
        error_masked = (masked[0](x) - dense_out).square().sum()
        error_refit = (refitted[0](x) - dense_out).square().sum()
    assert error_refit < error_masked


@pytest.mark.parametrize("method", ["sparsegpt", "ecp-obs"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_reconstructive_methods_meet_the_target_and_the_report_is_what_was_done(method: str, sparsity: float) -> None:
    model = _relu_mlp()
    report = ecp_fast.prune(model, _batches(), sparsity=sparsity, method=method, progress=False)
    zeros = sum(int((module.weight == 0).sum()) for module in model if isinstance(module, nn.Linear))
    total = sum(module.weight.numel() for module in model if isinstance(module, nn.Linear))
    assert report.total_pruned == zeros
    assert report.sparsity == pytest.approx(sparsity, abs=0.02)
    for layer in report.layers:  # masks are installed and agree with the weights
        module = dict(model.named_modules())[layer.name]
        assert bool((module.weight[module.weight_mask == 0] == 0).all())
        assert layer.pruned == int((module.weight_mask == 0).sum())
    assert total == report.total_weights
    if report.divergences:
        assert report.candidate == min(report.divergences, key=report.divergences.get)


def test_sparsegpt_prunes_every_layer_to_the_same_sparsity_and_matches_the_sweep_on_one_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(20, 6).double()
    model = nn.Sequential(layer)
    batches = _batches(fan_in=20)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    ecp_fast.prune(model, batches, sparsity=0.5, method="sparsegpt", progress=False)
    x = torch.cat([b[0] for b in batches])
    design = _augmented_inputs(x)
    expected = obs.obs_sweep(weight, bias, design.T @ design, 0.5)
    torch.testing.assert_close(layer.weight.detach(), expected.weight, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(layer.bias.detach(), expected.bias, rtol=1e-6, atol=1e-9)


def test_two_to_four_and_row_patterns_hold_exactly() -> None:
    model = _relu_mlp(sizes=(12, 16, 8, 4))
    ecp_fast.prune(model, _batches(), method="ecp-obs", scope="2:4", progress=False)
    for module in (model[0], model[2], model[4]):
        groups = (module.weight_mask.reshape(module.weight.shape[0], -1, 4) != 0).sum(-1)
        assert bool((groups == 2).all())
    model = _relu_mlp()
    ecp_fast.prune(model, _batches(), sparsity=0.75, method="sparsegpt", scope="row", progress=False)
    assert bool(((model[0].weight_mask == 0).sum(1) == 9).all())


def test_conv_and_leading_dimension_layers_reconstruct() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(1), nn.Linear(4 * 5 * 5, 3)).double()
    batches = [(torch.randn(8, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(2)]
    report = ecp_fast.prune(model, batches, sparsity=0.5, method="ecp-obs", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    tokens = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    token_batches = [torch.randn(3, 7, 6, dtype=torch.float64) for _ in range(2)]
    report = ecp_fast.prune(tokens, token_batches, sparsity=0.5, method="sparsegpt", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.05)


def test_a_failure_inside_the_reconstruction_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _relu_mlp()
    before = _state(model)
    calls = {"count": 0}
    original = obs.refit

    def failing_refit(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(obs, "refit", failing_refit)
    with pytest.raises(KeyboardInterrupt):
        ecp_fast.prune(model, _batches(), sparsity=0.5, method="ecp-obs", allocation="uniform", progress=False)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not any(hasattr(module, "weight_mask") for module in model.modules())


def test_a_singular_layer_is_named_with_what_to_do_and_the_model_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _relu_mlp()
    before = _state(model)
    original = obs.refit

    def singular_for_the_second_layer(weight, *args, **kwargs):
        if weight.shape == (8, 16):
            raise obs.SingularError("the Gram matrix restricted to a row's kept inputs is singular with ridge=0.01")
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(obs, "refit", singular_for_the_second_layer)
    with pytest.raises(ValueError, match=r"layer '2' cannot be reconstructed: .*exclude=\['2'\]") as caught:
        ecp_fast.prune(model, _batches(), sparsity=0.5, method="ecp-obs", allocation="uniform", progress=False)
    assert isinstance(caught.value.__cause__, obs.SingularError) and "ridge" not in str(caught.value)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_a_layer_the_output_never_sees_is_reconstructed_with_every_sample_weighing_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An auxiliary head has sensitivity 0 on every sample: ecp-obs weighs its samples 1 (a sum of 0
    weights left it nothing to solve), as sparsegpt does."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(12, 16), nn.Linear(16, 3), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = torch.relu(self.body(x))
            return self.head(hidden), self.aux(hidden)

    torch.manual_seed(8)
    model = TwoHeads().double()
    with caplog.at_level("WARNING", logger="ecp_fast.pruning.pruner"):
        report = ecp_fast.prune(model, _batches(), sparsity=0.5, method="ecp-obs", allocation="uniform", progress=False)
    assert "['aux'] do not affect the output" in caplog.text
    assert {layer.name: layer.sparsity for layer in report.layers} == pytest.approx(
        {"body": 0.5, "head": 0.5, "aux": 0.5}, abs=0.02
    )
    assert bool(torch.isfinite(model.aux.weight).all()) and int((model.aux.weight != 0).sum()) == 16


def test_bad_arguments_are_refused_before_any_change() -> None:
    model = _relu_mlp()
    before = _state(model)
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.prune(0.5, method="sparsegpt")
    pruner.calibrate(_batches())
    with pytest.raises(ValueError, match="argument 'allocation'"):
        pruner.prune(0.5, method="ecp-obs", allocation="greedy")
    with pytest.raises(ValueError, match="argument 'steps'"):
        pruner.prune(0.5, method="sparsegpt", steps=3)
    with pytest.raises(ValueError, match="argument 'method'"):
        pruner.prune(0.5, method="nope", reconstruct=True)
    with pytest.raises(ValueError, match="argument 'sparsity'"):
        pruner.prune(1.5, method="sparsegpt")
    for scope in ("layer", "row", "2:4"):
        with pytest.raises(ValueError, match=rf"argument 'allocation': scope='{scope}' prunes every layer"):
            pruner.prune(0.5, method="ecp-obs", scope=scope, allocation="search")
    one_shot = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    one_shot.calibrate(iter(_batches()))
    with pytest.raises(ValueError, match="re-iterable"):
        one_shot.prune(0.5, method="sparsegpt")
    assert all(torch.equal(model.state_dict()[key], before[key]) for key in before)


@pytest.mark.parametrize("method", ["ecp-obs", "sparsegpt"])
def test_a_layer_scope_gives_every_layer_the_same_sparsity(method: str) -> None:
    model = _relu_mlp(sizes=(12, 24, 16, 3))
    report = ecp_fast.prune(model, _batches(), sparsity=0.6, method=method, scope="layer", progress=False)
    assert report.allocation == "uniform"
    assert [layer.sparsity for layer in report.layers] == pytest.approx([0.6] * 3, abs=0.02)


def test_size_split_meets_the_total_and_prunes_larger_layers_harder() -> None:
    sizes = {"a": 1000, "b": 100, "c": 10}
    split = allocation.size_split(sizes, 0.9, 0.5)
    kept = sum((1 - split[name]) * size for name, size in sizes.items())
    assert kept == pytest.approx(0.1 * 1110, rel=1e-9)
    assert split["a"] > split["b"] > split["c"]
    assert allocation.size_split(sizes, 0.9, 0.0) == pytest.approx(allocation.uniform_split(sizes, 0.9))


def test_a_floored_split_meets_the_total_with_every_layer_at_least_at_its_floor() -> None:
    sizes = {"a": 100, "b": 300, "c": 600}
    split = {"a": 0.2, "b": 0.5, "c": 0.8}  # 0.65 in all
    floored = allocation.floored_split(split, {"a": 0.9, "b": 0.0, "c": 0.1}, sizes, 0.65)
    assert floored["a"] == pytest.approx(0.9)
    assert sum(floored[name] * size for name, size in sizes.items()) == pytest.approx(0.65 * 1000)
    # b and c give up the same fraction of what they had above their floors
    assert (floored["b"] - 0.0) / 0.5 == pytest.approx((floored["c"] - 0.1) / 0.7)
    # floors past the total: every layer stays at its floor (nothing can be given back)
    assert allocation.floored_split(split, {"a": 0.9, "b": 0.9, "c": 0.9}, sizes, 0.65) == pytest.approx(
        {"a": 0.9, "b": 0.9, "c": 0.9}
    )
    assert allocation.floored_split(split, dict.fromkeys(sizes, 0.0), sizes, 0.65) == pytest.approx(split)


def test_divergence_is_zero_for_identical_outputs_and_positive_otherwise() -> None:
    logits = [torch.randn(5, 3, dtype=torch.float64)]
    assert allocation.output_divergence(logits, logits, "kl") == pytest.approx(0.0, abs=1e-12)
    assert allocation.output_divergence(logits, [logits[0] + torch.randn(5, 3, dtype=torch.float64)], "kl") > 0
    assert allocation.output_divergence(logits, [logits[0] + 1], "mse") == pytest.approx(1.0)


def test_kl_reads_the_class_axis_beside_the_targets_and_auto_falls_back_to_mse_without_one() -> None:
    """One logit per sample gave every candidate KL 0 (a softmax over one value), and a segmentation
    output's KL was taken over its image columns."""
    classifier = nn.Linear(12, 3).double()
    assert allocation.resolve_divergence("auto", _batches(), classifier) == ("kl", None)
    regression = [(torch.randn(2, 12, dtype=torch.float64), torch.randn(2, 1))]
    assert allocation.resolve_divergence("auto", regression, classifier) == ("mse", None)
    one_logit = nn.Linear(12, 1).double()
    assert allocation.resolve_divergence("auto", _batches(), one_logit) == ("mse", None)
    with pytest.raises(ValueError, match=r"argument 'divergence': 'kl' compares class probabilities.*\(40, 1\)"):
        allocation.resolve_divergence("kl", _batches(), one_logit)
    segmenter = nn.Conv2d(2, 4, 1).double()  # (B, 4 classes, H, W) for integer label maps (B, H, W)
    images = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    kind, output_fn = allocation.resolve_divergence("auto", [(images, torch.randint(0, 4, (3, 5, 6)))], segmenter)
    assert kind == "kl" and output_fn is not None
    logits = segmenter(images).detach()
    same_probabilities = logits + 5.0 * torch.randn(3, 1, 5, 6, dtype=torch.float64)  # one shift for every class
    assert allocation.output_divergence([output_fn(logits)], [output_fn(same_probabilities)], "kl") == pytest.approx(
        0.0, abs=1e-12
    )
    assert allocation.output_divergence([output_fn(logits)], [output_fn(logits.flip(1))], "kl") > 0.01


def test_forward_order_follows_execution_not_registration() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x).relu())

    model = Reversed()
    specs = {name: LayerSpec(name, module, "linear") for name, module in model.named_children()}
    assert reconstruction.forward_order(model, specs, torch.randn(2, 3)) == ["first", "second"]


class _Branching(nn.Module):
    """``branch`` runs only on batches whose first input is positive (a data-dependent path)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.branch, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.body(x))
        if bool(x[0, 0] > 0):
            hidden = torch.relu(self.branch(hidden))
        return self.head(hidden)


def _branching_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = _batches(count=4)
    for index, (inputs, _) in enumerate(batches):
        inputs[0, 0] = 1.0 if index % 2 else -1.0  # the branch runs on batches 1 and 3 only
    return batches


@pytest.mark.parametrize(
    ("method", "extra"), [("sparsegpt", {}), ("ecp-obs", {}), ("magnitude", {"reconstruct": True})]
)
def test_a_layer_that_skips_the_first_batch_is_reconstructed_from_the_batches_it_runs_on(
    method: str, extra: dict
) -> None:
    torch.manual_seed(9)
    model = _Branching().double()
    batches = _branching_batches()
    specs = {name: LayerSpec(name, module, "linear") for name, module in model.named_children()}
    order = reconstruction.forward_order(model, specs, iter(split[0] for split in batches))
    assert order == ["body", "branch", "head"]
    report = ecp_fast.prune(model, batches, sparsity=0.5, method=method, progress=False, **extra)
    assert {layer.name for layer in report.layers} == {"body", "branch", "head"}
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    assert 0 < 1 - float(model.branch.weight_mask.mean()) < 1
    hessian, _ = reconstruction.layer_grams(model, None, specs["branch"], batches, None)
    ran = [inputs for index, (inputs, _) in enumerate(batches) if index % 2]
    hidden = torch.cat([torch.relu(model.body(inputs)) for inputs in ran]).detach()
    torch.testing.assert_close(hessian, _augmented_inputs(hidden).T @ _augmented_inputs(hidden))


def test_a_layer_no_batch_reaches_is_named_with_what_to_do() -> None:
    model = _Branching().double()
    batches = _batches(count=2)
    for inputs, _ in batches:
        inputs[0, 0] = -1.0
    specs = {name: LayerSpec(name, module, "linear") for name, module in model.named_children()}
    with pytest.raises(ValueError, match=r"layers \['branch'\] ran on none of the calibration batches.*exclude="):
        reconstruction.forward_order(model, specs, iter(split[0] for split in batches))


def test_sequential_blocks_accept_reconstructive_methods() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2)]).double()
    inputs = [torch.randn(16, 8, dtype=torch.float64) for _ in range(2)]
    report = ecp_fast.prune_sequential(blocks, inputs, sparsity=0.5, method="sparsegpt", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    assert all(hasattr(block[0], "weight_mask") for block in blocks)


@pytest.mark.parametrize("method", ["ecp-obs", "sparsegpt"])
def test_an_already_pruned_model_keeps_its_zeros_and_meets_the_new_target(method: str) -> None:
    model = _relu_mlp()
    batches = _batches()
    ecp_fast.prune(model, batches, sparsity=0.5, method="magnitude", scope="layer", progress=False)
    before = {
        name: module.weight_mask.clone() for name, module in model.named_modules() if hasattr(module, "weight_mask")
    }
    report = ecp_fast.prune(model, batches, sparsity=0.8, method=method, progress=False)
    assert report.sparsity == pytest.approx(0.8, abs=0.02)
    for name, mask in before.items():
        after = dict(model.named_modules())[name].weight_mask
        assert bool((after[mask == 0] == 0).all()), f"{name}: a removed weight came back"


@pytest.mark.parametrize("method", ["sparsegpt", "ecp-obs"])
def test_a_row_target_counts_each_rows_removed_weights_as_the_mask_methods_do(method: str) -> None:
    """An unevenly pre-pruned layer: a row already past the target loses nothing more, the others
    are brought to it (the layer's overall sparsity is no per-row quota)."""
    from torch.nn.utils import prune as torch_prune

    model = _relu_mlp(sizes=(12, 24, 16, 3))
    torch_prune.l1_unstructured(model[2], "weight", amount=0.7)
    before = model[2].weight_mask.clone()
    report = ecp_fast.prune(model, _batches(), sparsity=0.5, method=method, scope="row", progress=False)
    quota = round(0.5 * 24)
    expected = torch.clamp((before == 0).sum(dim=1), min=quota)
    assert torch.equal((model[2].weight_mask == 0).sum(dim=1), expected)
    assert bool((model[2].weight_mask[before == 0] == 0).all())
    assert report.sparsity == pytest.approx(_zeros(model))


def test_the_search_meets_the_total_over_a_layer_pruned_past_its_share() -> None:
    """Every candidate split is raised to the layers' present sparsity and gives the excess back
    elsewhere: the total is the one asked for (it was over it when a floored candidate won)."""
    from torch.nn.utils import prune as torch_prune

    model = _relu_mlp(sizes=(12, 24, 16, 3))
    torch_prune.l1_unstructured(model[2], "weight", amount=0.9)
    report = ecp_fast.prune(model, _batches(), sparsity=0.6, method="ecp-obs", progress=False)
    assert report.allocation == "search"
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    assert 1 - float(model[2].weight_mask.mean()) >= 0.9


def _zeros(model: nn.Module) -> float:
    weights = [module.weight for module in model.modules() if isinstance(module, nn.Linear)]
    return sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)


# ---- what a reconstruction holds in memory ------------------------------------------------------


def _specs(model: nn.Module) -> dict[str, LayerSpec]:
    linear = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return {name: LayerSpec(name, module, "linear") for name, module in linear.items()}


def test_the_cross_term_is_the_gram_matrix_itself_until_a_layer_before_is_pruned() -> None:
    """Where the layer's inputs are still the dense ones, ``C`` is ``H`` (one tensor, not two); after
    an earlier layer is pruned it is the Gram matrix of the pruned and the dense inputs."""
    model, batches = _relu_mlp(), _batches()
    specs = _specs(model)
    dense = reconstruction.DenseReference(model, reconstruction.cache_budget(specs))
    hessian, cross = reconstruction.layer_grams(model, dense, specs["2"], batches, None)
    assert cross is hessian
    with torch.no_grad():
        model[0].weight[:, ::2] = 0  # prune layer 0: layer 2's inputs change
    hessian, cross = reconstruction.layer_grams(model, dense, specs["2"], batches, None)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        pruned = _augmented_inputs(model[1](model[0](x)))
        original = _augmented_inputs(dense.model[1](dense.model[0](x)))
    torch.testing.assert_close(hessian, pruned.T @ pruned)
    torch.testing.assert_close(cross, pruned.T @ original)


def test_the_dense_inputs_kept_never_pass_the_budget_and_views_of_the_batches_cost_nothing() -> None:
    model, batches = _relu_mlp(), _batches(count=4)
    specs = _specs(model)
    one_batch = 40 * 16 * 8  # layer 2's dense inputs for one batch, float64
    resident = {inputs.untyped_storage().data_ptr() for inputs, _ in batches}
    dense = reconstruction.DenseReference(model, budget=3 * one_batch + 1, resident=resident)
    for index, (inputs, _) in enumerate(batches):
        assert torch.equal(dense.layer_inputs(specs["0"], index, inputs), inputs)
        dense.layer_inputs(specs["2"], index, inputs)
    assert dense.cached_bytes == 3 * one_batch  # layer 0's inputs are the caller's batches themselves
    assert len([key for key in dense.cache if key[0] == "2"]) == 3
    assert len([key for key in dense.cache if key[0] == "0"]) == 4
    # a copy of a batch (one moved to the model's device) is not the caller's: it costs its bytes
    copied = reconstruction.DenseReference(model, budget=40 * 12 * 8 + 1, resident=resident)
    for index, (inputs, _) in enumerate(batches):
        copied.layer_inputs(specs["0"], index, inputs.clone())
    assert copied.cached_bytes == 40 * 12 * 8 and len(copied.cache) == 1


def test_reference_outputs_beyond_the_budget_are_recomputed_alike() -> None:
    model, batches = _relu_mlp(), _batches(count=5)
    expected = allocation.model_outputs(model, batches)
    one_batch = 40 * 3 * 8
    reference = reconstruction.ReferenceOutputs(model, batches, None, budget=2 * one_batch)
    for _ in range(2):
        outputs = list(reference)
        assert len(outputs) == 5 and all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert sorted(reference.kept) == [0, 1] and reference.used == 2 * one_batch


def test_refit_takes_a_gram_matrix_that_is_not_contiguous() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(200, 30, generator=generator, dtype=torch.float64)
    design = _augmented_inputs(x)
    hessian = design.T @ design
    hessian = (hessian + hessian.T) / 2  # symmetric bit for bit
    weight, bias = torch.randn(40, 30, generator=generator, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)
    mask = torch.rand(40, 30, generator=generator) < 0.5  # more distinct rows than are grouped: padded solves
    transposed = hessian.T  # the same symmetric matrix, not contiguous
    assert not transposed.is_contiguous()
    expected = obs.refit(weight, bias, mask, hessian.contiguous())
    actual = obs.refit(weight, bias, mask, transposed)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_the_search_keeps_only_the_closest_candidates_first_layer_sweep_and_drops_the_factor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between allocation candidates compared through their sweeps, the first layer's inverse factor is
    kept in place of its ``H`` (made once, for every candidate), and only the closest candidate's sweep;
    the finals drop the factor, reuse that sweep (then drop it) and keep ``H`` for their refits."""
    seen: list[tuple[int, int, int]] = []  # (sweeps, factors, grams) after each candidate
    original = reconstruction.FirstLayer.retain_sweeps

    def spy(self, keys):
        original(self, keys)
        seen.append((len(self.sweeps), len(self.factors), len(self.grams)))

    factors = []
    make_factor = obs.inverse_factor

    def factor_spy(*args, **kwargs):
        factors.append(1)
        return make_factor(*args, **kwargs)

    monkeypatch.setattr(reconstruction.FirstLayer, "retain_sweeps", spy)
    monkeypatch.setattr(obs, "inverse_factor", factor_spy)
    report = ecp_fast.prune(_relu_mlp(), _batches(), sparsity=0.8, method="ecp-obs", progress=False)
    proxies = len(report.divergences) - 2  # the two finalists come last
    assert proxies > 2 and len(seen) == len(report.divergences)
    assert all(sweeps <= 1 and factors == 1 and grams == 0 for sweeps, factors, grams in seen[:proxies])
    assert all(sweeps <= 1 and factors == 0 and grams == 1 for sweeps, factors, grams in seen[proxies:])
    assert seen[-1][0] == 0  # the last finalist's masks were given: the kept sweep went before it
    assert len(factors) == 1  # no factor made again: the finalist reused the kept sweep


def test_the_replay_budget_leaves_out_the_batches_themselves() -> None:
    from ecp_fast.pruning.replay import OutputReplay

    layer = nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    used = []
    for replay in (OutputReplay(resident={x.untyped_storage().data_ptr()}), OutputReplay()):
        replay.install([layer])
        with torch.no_grad():
            layer(x)
        used.append(replay.used)
        replay.remove()
    assert used == [5 * 4 * 8, 5 * 4 * 8 + 5 * 6 * 8]  # the output alone; the output and the inputs


def test_a_search_keeps_its_activation_caches_within_one_largest_gram_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many samples: the replayed outputs, the dense inputs and the reference outputs kept share
    one budget, the largest ``H``, and stay within it together."""
    from ecp_fast.pruning.replay import CacheBudget

    budgets: list[CacheBudget] = []
    peaks: list[int] = []
    take = CacheBudget.take

    def spy(self, size, evict=False):
        taken = take(self, size, evict)
        peaks.append(self.used)
        if self not in budgets:
            budgets.append(self)
        return taken

    monkeypatch.setattr(CacheBudget, "take", spy)
    model = _relu_mlp()
    largest = (16 + 1) ** 2 * 8  # layer 2 has 16 inputs
    assert reconstruction.cache_budget(_specs(model)) == largest
    batches = _batches(count=12, size=8)  # layer 2's dense inputs alone: 12 x 8 x 16 x 8 bytes = 5.3 x largest
    ecp_fast.prune(model, batches, sparsity=0.8, method="ecp-obs", progress=False)
    assert len(budgets) == 1 and budgets[0].limit == largest
    assert 0 < max(peaks) <= largest


def test_outcomes_are_the_working_copys_weights_and_the_dense_reference_is_the_callers_model() -> None:
    """No second copy of the weights: each outcome's weight is the pruned working copy's own tensor,
    and the refit aims at the caller's model itself (unchanged, its modes as they were, mixed ones too)."""
    model, batches = _relu_mlp(), _batches()
    model.train()
    model[2].eval()  # a model that mixes modes gets exactly its modes back
    modes = [module.training for module in model.modules()]
    before = copy.deepcopy(model.state_dict())
    specs = _specs(model)
    plans = {name: reconstruction.LayerPlan(sparsity=0.5) for name in specs}
    run = reconstruction.ReconstructionRun(reconstruction.RECONSTRUCTIVE_METHODS["ecp-obs"], batches)
    references = []
    original = reconstruction.DenseReference.layer_inputs

    def spy(self, *args):
        references.append(self.model)
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconstruction.DenseReference, "layer_inputs", spy)
        outcomes, work = reconstruction.reconstruct(model, specs, plans, run)
    assert references and all(reference is model for reference in references)
    assert run.dense is None and run.cache is None  # made for the call and let go: a run used again starts afresh
    for name, outcome in outcomes.items():
        stored = dict(work.named_modules())[name].weight
        assert outcome.weight.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
        assert torch.equal(outcome.weight, stored) and bool((outcome.weight[~outcome.keep] == 0).all())
    assert [module.training for module in model.modules()] == modes and False in modes
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_search_gives_a_model_that_mixes_modes_exactly_its_modes_back() -> None:
    """The candidates are compared with the caller's model in eval mode; a submodule kept in eval
    inside a model in training (a frozen part) stays so."""
    model = _relu_mlp()
    model.train()
    model[1].eval()
    modes = [module.training for module in model.modules()]
    report = ecp_fast.prune(model, _batches(), sparsity=0.8, method="ecp-obs", progress=False)
    assert len(report.divergences) > 2
    assert [module.training for module in model.modules()] == modes


def test_a_channels_last_convolution_is_reconstructed_as_a_contiguous_one() -> None:
    """A weight with no ``(out, in)`` view keeps its outcome's own copy; the results are the same."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(10, 3, 6, 6, generator=generator), torch.randint(0, 5, (10,), generator=generator))]
    strided = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not strided[0].weight.is_contiguous()
    ecp_fast.prune(model, batches, sparsity=0.5, method="ecp-obs", progress=False)
    ecp_fast.prune(strided, batches, sparsity=0.5, method="ecp-obs", progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, strided.state_dict()[key]), key


def test_a_shuffling_loader_prunes_as_the_batches_its_calibration_pass_brought() -> None:
    """ecp-obs pairs each batch's kept row sensitivities with that batch's samples: with a shuffling
    ``DataLoader`` the reconstruction runs on the batches calibration saw, not on a new draw."""
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(96, 12, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (96,), generator=generator)

    def loader() -> DataLoader:
        order = torch.Generator().manual_seed(7)
        return DataLoader(TensorDataset(inputs, targets), batch_size=32, shuffle=True, generator=order)

    shuffling = loader()
    first_draw, second_draw = list(shuffling), list(shuffling)  # a loader made alike brings first_draw first
    assert not torch.equal(first_draw[0][0], second_draw[0][0])
    model, expected = _relu_mlp(), _relu_mlp()
    ecp_fast.prune(model, loader(), sparsity=0.6, method="ecp-obs", progress=False)
    ecp_fast.prune(expected, first_draw, sparsity=0.6, method="ecp-obs", progress=False)
    for key, value in expected.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize(("method", "extra"), [("sparsegpt", {}), ("wanda", {"reconstruct": True})])
def test_a_model_pruned_and_run_since_is_reconstructed_again(method: str, extra: dict) -> None:
    """After a prune and a forward pass with autograd, a masked layer's weight is a computed tensor
    that ``copy.deepcopy`` refuses; the working copy is made all the same."""
    model = _relu_mlp()
    batches = _batches()
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate(batches, loss_fn=nn.CrossEntropyLoss())
    pruner.prune(0.5, method="magnitude", scope="layer")
    model(batches[0][0]).sum().backward()
    assert not model[0].weight.is_leaf
    report = pruner.prune(0.8, method=method, scope="layer", **extra)
    assert report.sparsity == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("method,reconstruct", [("magnitude", True), ("ecp-obs", False), ("wanda", True)])
def test_a_reconstruction_that_removes_nothing_leaves_the_model_as_it_was(method, reconstruct) -> None:
    """Sparsity 0: the refit of a layer that loses nothing, on dense inputs, only added rounding (and a
    bias of rounding noise to a bias-free layer)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = ecp_fast.prune(model, _batches(), 0.0, method, reconstruct=reconstruct, progress=False)
    assert report.total_pruned == 0 and not report.added_biases
    for name, module in (("0", model[0]), ("2", model[2])):
        assert module.bias is None
        assert torch.equal(module.weight_orig, before[f"{name}.weight"])


def _linear_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of the ``F.linear`` calls that really compute (replayed outputs do not call it)."""
    calls = [0]
    linear = torch.nn.functional.linear

    def counted(*args, **kwargs):
        calls[0] += 1
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.modules.linear.F, "linear", counted)
    return calls


@pytest.mark.parametrize("method,reconstruct", [("ecp-obs", False), ("sparsegpt", False), ("wanda", True)])
def test_the_activation_cache_trades_memory_for_time_and_never_changes_the_result(
    monkeypatch: pytest.MonkeyPatch, method: str, reconstruct: bool
) -> None:
    """``activation_cache`` sizes the caches' budget (in largest ``H``): 0 keeps nothing and computes more
    layers again, a large one keeps every activation; the pruned weights are bit for bit the same."""
    from ecp_fast.pruning.replay import CacheBudget

    limits: list[int] = []
    init = CacheBudget.__init__

    def spy(self, limit, resident=None):
        limits.append(limit)
        init(self, limit, resident)

    monkeypatch.setattr(CacheBudget, "__init__", spy)
    calls = _linear_calls(monkeypatch)
    largest = (16 + 1) ** 2 * 8
    states, counts = {}, {}
    for size in (0, 0.5, None, 1000):
        model, limits[:], calls[0] = _relu_mlp(), [], 0
        ecp_fast.prune(
            model, _batches(count=6), 0.7, method, reconstruct=reconstruct, progress=False, activation_cache=size
        )
        states[size], counts[size] = _state(model), calls[0]
        assert limits[-1] == int((1 if size is None else size) * largest)
    assert all(torch.equal(states[size][key], states[None][key]) for size in states for key in states[None])
    assert counts[0] >= counts[0.5] >= counts[None] >= counts[1000] and counts[0] > counts[1000]


def test_a_bad_activation_cache_is_refused_before_any_change() -> None:
    model = _relu_mlp()
    before = _state(model)
    for size in (-1, float("nan"), float("inf"), True, "1", [1]):
        with pytest.raises(ValueError, match="argument 'activation_cache' must be a finite number >= 0"):
            ecp_fast.prune(model, _batches(), 0.5, "ecp-obs", progress=False, activation_cache=size)
    with pytest.raises(ValueError, match="argument 'activation_cache' sizes the caches of a reconstruction"):
        ecp_fast.prune(model, _batches(), 0.5, "magnitude", progress=False, activation_cache=1)
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    pruner.calibrate(_batches())
    with pytest.raises(ValueError, match="argument 'activation_cache'"):
        pruner.prune(0.5, method="sparsegpt", activation_cache=-0.5)
    with pytest.raises(ValueError, match="argument 'activation_cache' sizes"):
        pruner.prune(0.5, method="ecp", scope="neuron", activation_cache=0)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))]).double()
    block_state = _state(blocks)
    inputs = [torch.randn(16, 8, dtype=torch.float64)]
    with pytest.raises(ValueError, match="argument 'activation_cache' sizes"):
        ecp_fast.prune_sequential(blocks, inputs, 0.5, method="magnitude", progress=False, activation_cache=1)
    with pytest.raises(ValueError, match="argument 'activation_cache' must be"):
        ecp_fast.prune_sequential(blocks, inputs, 0.5, method="sparsegpt", progress=False, activation_cache=-1)
    assert all(torch.equal(model.state_dict()[key], before[key]) for key in before)
    assert all(torch.equal(blocks.state_dict()[key], block_state[key]) for key in block_state)
    assert not any(hasattr(module, "weight_mask") for module in [*model.modules(), *blocks.modules()])


def test_sequential_blocks_pass_the_activation_cache_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _linear_calls(monkeypatch)
    counts, states = [], []
    for size in (0, 1000):
        torch.manual_seed(0)
        blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2)]).double()
        inputs = [torch.randn(16, 8, dtype=torch.float64) for _ in range(3)]
        calls[0] = 0
        ecp_fast.prune_sequential(
            blocks, inputs, 0.5, method="ecp-obs", scope="global", progress=False, activation_cache=size
        )
        counts.append(calls[0])
        states.append(_state(blocks))
    assert counts[0] > counts[1]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_reference_outputs_claim_the_budget_first_and_are_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``keep_first`` keeps the dense outputs of the first batches that fit (each 40 x 3 float64 here);
    iterating then computes only the others, and the outputs are the model's."""
    from ecp_fast.pruning.replay import CacheBudget

    model, batches = _relu_mlp(), _batches(count=3)
    one = 40 * 3 * 8
    budget = CacheBudget(2 * one + one // 2)
    reference = reconstruction.ReferenceOutputs(model, batches, None, budget)
    calls = _linear_calls(monkeypatch)
    reference.keep_first()
    assert sorted(reference.kept) == [0, 1] and budget.used == reference.used == 2 * one
    kept_calls, calls[0] = calls[0], 0
    outputs = list(reference)
    assert kept_calls == 2 * 3 and calls[0] == 3  # the third would not fit: computed only when iterated
    with torch.no_grad():
        assert all(torch.equal(out, model(x)) for out, (x, _) in zip(outputs, batches, strict=True))
    full = CacheBudget(one)
    full.used = one
    calls[0] = 0
    reconstruction.ReferenceOutputs(model, batches, None, full).keep_first()
    assert calls[0] == 0  # no room: nothing computed ahead


@pytest.mark.parametrize("method,reconstruct", [("ecp-obs", False), ("magnitude", True)])
def test_a_target_below_the_present_sparsity_warns_as_the_mask_methods_do(method: str, reconstruct: bool) -> None:
    model = _relu_mlp()
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    pruner.calibrate(_batches())
    pruner.prune(0.6, method="sparsegpt")
    with pytest.warns(UserWarning, match=r"already 0\.\d+ sparse, above the requested sparsity 0\.4000"):
        report = pruner.prune(0.4, method=method, reconstruct=reconstruct)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("method", ["ecp-obs", "sparsegpt"])
def test_a_row_scope_removes_per_row_what_the_mask_methods_remove_over_several_blocks(method: str) -> None:
    """130 inputs are two sweep blocks (128 + 2): the row's count is met over both, not rounded per block."""
    counts = {}
    for name in (method, "magnitude"):
        model = _relu_mlp(sizes=(130, 9, 3))
        ecp_fast.prune(model, _batches(fan_in=130), 0.9, name, scope="row", progress=False)
        counts[name] = (model[0].weight == 0).sum(dim=1).tolist()
    assert counts[method] == counts["magnitude"] == [117] * 9


def test_a_capped_split_meets_the_total_with_no_layer_emptied_or_above_the_cap() -> None:
    sizes = {"a": 1000, "b": 48, "c": 300}
    split = {"a": 0.3, "b": 1.0, "c": 0.999}  # a global ranking that asks for all of b
    total = (0.3 * 1000 + 48 + 0.999 * 300) / 1348
    capped = allocation.capped_split(split, 0.995, sizes, total)
    assert capped["b"] == pytest.approx(47 / 48) and capped["c"] == pytest.approx(0.995)
    assert sum(capped[name] * size for name, size in sizes.items()) == pytest.approx(total * 1348)
    assert capped["a"] > 0.3
    within = {"a": 0.5, "b": 0.5, "c": 0.5}
    assert allocation.capped_split(within, 0.995, sizes, 0.5) == within


def test_a_global_allocation_that_asks_for_a_whole_layer_still_meets_the_target() -> None:
    """A small last layer the global ranking would empty keeps a weight; the rest goes to the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    batches = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(2)]
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)
    pruner.calibrate(batches)
    report = pruner.prune(0.5, method="sparsegpt", allocation="global")
    assert report.sparsity == pytest.approx(0.5, abs=0.5 / 176)  # within half a weight (it fell 1 short)
    assert all(layer.pruned < layer.weights for layer in report.layers)


def test_an_activation_cache_beyond_any_memory_caches_everything_and_changes_nothing() -> None:
    states = []
    for size in (1e306, None):
        model = _relu_mlp()
        ecp_fast.prune(model, _batches(), 0.5, "sparsegpt", progress=False, activation_cache=size)
        states.append(_state(model))
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[1])


@pytest.mark.parametrize("method", ["ecp", "ecp-obs", "sparsegpt"])
@pytest.mark.parametrize("frozen", [True, False])
def test_a_bias_added_for_the_compensation_is_trainable_as_the_weight_is(method: str, frozen: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)).double()
    model.requires_grad_(not frozen)
    report = ecp_fast.prune(model, _batches(), 0.6, method, progress=False)
    assert report.added_biases and all(getattr(model, name).bias is not None for name in report.added_biases)
    assert all(parameter.requires_grad is not frozen for parameter in model.parameters())
