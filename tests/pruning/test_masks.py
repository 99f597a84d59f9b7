"""Masks: install, remove and load from a state dict; everything checked first, nothing half-done."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from fingerprint import assert_unchanged, failing_after, fingerprint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ecp_fast.pruning import masks
from ecp_fast.pruning.masks import apply_masks_from_state_dict, check_maskable, install_mask, remove_masks


class Boom(Exception):
    """The failure the tests inject."""


def net(bias: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4, bias=bias), nn.ReLU(), nn.Linear(4, 3, bias=bias), nn.Tanh(), nn.Linear(3, 2, bias=bias)
    )


def pruned_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A saved pruned model: masks on every Linear and compensated biases the bare model lacks."""
    model = net(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for index in (0, 2, 4):
        layer = model[index]
        install_mask(layer, (torch.rand(layer.weight.shape, generator=generator) > 0.4).float())
        layer.bias = nn.Parameter(torch.randn(layer.out_features, generator=generator))
    return {key: value.clone() for key, value in model.state_dict().items()}


# ---- loading ---------------------------------------------------------------------------------------


def test_round_trip_adds_masks_and_biases() -> None:
    state = pruned_state()
    model = net()
    assert apply_masks_from_state_dict(model, state) == ["0", "2", "4"]
    model.load_state_dict(state)
    saved = net()
    apply_masks_from_state_dict(saved, state)
    saved.load_state_dict(state)
    x = torch.randn(7, 5)
    torch.testing.assert_close(model(x), saved(x))
    assert model[2].bias.shape == (3,) and torch.equal(model[2].weight_mask, state["2.weight_mask"])


def corrupt(state: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**state, key: value}


BAD_STATE_DICTS = {
    "path string": (lambda s: "model.pt", TypeError, "argument 'state_dict' must be a mapping.*torch.load.*got str"),
    "None": (lambda s: None, TypeError, "argument 'state_dict' must be a mapping.*got NoneType"),
    "no such module": (lambda s: corrupt(s, "9.weight_mask", torch.ones(4, 5)), ValueError, "'9.weight_mask' names no"),
    "not prunable": (
        lambda s: corrupt(s, "1.weight_mask", torch.ones(4, 5)),
        ValueError,
        "layer '1' .ReLU. has no weight",
    ),
    "mask shape": (
        lambda s: corrupt(s, "4.weight_mask", torch.ones(3, 2)),
        ValueError,
        r"'4.weight_mask'\] must have the weight's shape \(2, 3\), got \(3, 2\)",
    ),
    "mask values": (
        lambda s: corrupt(s, "4.weight_mask", torch.full((2, 3), 0.5)),
        ValueError,
        "only 0 .removed. and 1",
    ),
    "mask nan": (lambda s: corrupt(s, "2.weight_mask", torch.full((3, 4), float("nan"))), ValueError, "only 0"),
    "mask not a tensor": (
        lambda s: corrupt(s, "2.weight_mask", [[1.0] * 4] * 3),
        TypeError,
        "must be a torch.Tensor, got list",
    ),
    "bias length": (
        lambda s: corrupt(s, "4.bias", torch.zeros(5)),
        ValueError,
        r"'4.bias'\] must have shape \(2,\) .the outputs of layer '4'., got \(5,\)",
    ),
    "bias not a tensor": (lambda s: corrupt(s, "2.bias", 0.0), TypeError, r"'2.bias'\] must be a tensor, got float"),
    "weight_orig shape": (
        lambda s: corrupt(s, "2.weight_orig", torch.zeros(4, 3)),
        ValueError,
        "weight's shape \\(3, 4\\), got \\(4, 3\\)",
    ),
    "orig without mask": (
        lambda s: {k: v for k, v in s.items() if k != "2.weight_mask"},
        ValueError,
        "has '2.weight_orig' but no '2.weight_mask'",
    ),
    "key not a string": (lambda s: {**s, 3: torch.ones(1)}, TypeError, "string keys, got 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATE_DICTS))
def test_bad_state_dict_is_refused_before_any_change(case: str) -> None:
    make, error, match = BAD_STATE_DICTS[case]
    model = net()
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        apply_masks_from_state_dict(model, make(pruned_state()))
    assert_unchanged(before, model)


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(sorted(BAD_STATE_DICTS)),
    dropped=st.sampled_from(["", "0.weight", "4.weight", "0.bias"]),
    premasked=st.booleans(),
)
def test_any_bad_entry_leaves_the_model_unchanged(case: str, dropped: str, premasked: bool) -> None:
    """Valid entries before or after the bad one, a model already masked or not: never a half-loaded model."""
    make, error, _ = BAD_STATE_DICTS[case]
    model = net()
    if premasked:
        install_mask(model[2], torch.ones(3, 4))
    state = {key: value for key, value in pruned_state().items() if not dropped or not key.startswith(dropped)}
    bad = make(state)
    before = fingerprint(model)
    with pytest.raises((TypeError, ValueError)):
        apply_masks_from_state_dict(model, bad)
    assert_unchanged(before, model)


def test_parametrized_layer_is_refused_by_name() -> None:
    model = net()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    before = fingerprint(model)
    with pytest.raises(
        ValueError,
        match="layer '2' has a parametrized weight .weight_norm/parametrize.*remove the "
        "parametrization or exclude the layer",
    ):
        apply_masks_from_state_dict(model, pruned_state())
    assert_unchanged(before, model)


def test_model_argument_is_checked() -> None:
    with pytest.raises(TypeError, match="argument 'model' must be an nn.Module, got dict"):
        apply_masks_from_state_dict({}, pruned_state())  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize("stage", ["first mask", "second mask", "third mask", "bias", "after bias"])
def test_failure_at_every_stage_restores(monkeypatch: pytest.MonkeyPatch, stage: str, error: BaseException) -> None:
    if stage.endswith("mask"):
        calls = ["first mask", "second mask", "third mask"].index(stage)
        monkeypatch.setattr(
            masks.torch_prune, "custom_from_mask", failing_after(calls, torch_prune.custom_from_mask, error)
        )
    elif stage == "bias":
        monkeypatch.setattr(masks, "_add_zero_bias", failing_after(1, masks._add_zero_bias, error))
    else:
        monkeypatch.setattr(masks.logger, "info", failing_after(2, lambda *a: None, error))
    model = net()
    before = fingerprint(model)
    with pytest.raises(type(error)):
        apply_masks_from_state_dict(model, pruned_state())
    assert_unchanged(before, model)


# ---- install and remove ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["parametrizations.weight_norm", "old weight_norm", "spectral_norm", "custom"])
def test_install_mask_refuses_a_parametrized_weight(style: str) -> None:
    layer = nn.Linear(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if style == "parametrizations.weight_norm":
            torch.nn.utils.parametrizations.weight_norm(layer)
        elif style == "old weight_norm":
            torch.nn.utils.weight_norm(layer)
        elif style == "spectral_norm":
            torch.nn.utils.spectral_norm(layer)
        else:
            parametrize.register_parametrization(layer, "weight", nn.Identity())
    before = fingerprint(layer)
    with pytest.raises(ValueError, match="layer 'fc1' has a parametrized weight .weight_norm/parametrize"):
        install_mask(layer, torch.ones(3, 4), name="fc1")
    assert_unchanged(before, layer)
    with pytest.raises(ValueError, match="parametrized weight"):
        check_maskable(layer)


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (torch.ones(4, 3), ValueError, r"weight's shape \(3, 4\), got \(4, 3\)"),
        (torch.full((3, 4), 2.0), ValueError, "only 0"),
        ([[1.0]], TypeError, "must be a torch.Tensor, got list"),
    ],
)
def test_install_mask_checks_the_mask(mask: Any, error: type[Exception], match: str) -> None:
    layer = nn.Linear(4, 3)
    before = fingerprint(layer)
    with pytest.raises(error, match=match):
        install_mask(layer, mask, name="fc")
    assert_unchanged(before, layer)


@pytest.mark.parametrize("error", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_install_mask_failure_inside_torch_prune_restores(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    layer = nn.Linear(4, 3)
    install_mask(layer, (torch.rand(3, 4) > 0.5).float())
    before = fingerprint(layer)
    original = torch_prune.PruningContainer.add_pruning_method

    def add_then_fail(self: Any, method: Any) -> None:
        original(self, method)
        raise error

    monkeypatch.setattr(torch_prune.PruningContainer, "add_pruning_method", add_then_fail)
    with pytest.raises(type(error)):
        install_mask(layer, torch.ones(3, 4))
    assert_unchanged(before, layer)


def test_remove_masks_makes_zeros_permanent() -> None:
    model = net()
    apply_masks_from_state_dict(model, pruned_state())
    model.load_state_dict(pruned_state())
    x = torch.randn(3, 5)
    expected = model(x)
    assert remove_masks(model) == ["0", "2", "4"]
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("error", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize("calls", [0, 1, 2])
def test_remove_masks_failure_restores(monkeypatch: pytest.MonkeyPatch, calls: int, error: BaseException) -> None:
    model = net()
    apply_masks_from_state_dict(model, pruned_state())
    model.load_state_dict(pruned_state())
    before = fingerprint(model)
    monkeypatch.setattr(masks.torch_prune, "remove", failing_after(calls, torch_prune.remove, error))
    with pytest.raises(type(error)):
        remove_masks(model)
    assert_unchanged(before, model)


def test_remove_masks_folds_bias_masks_and_names_what_it_changed() -> None:
    model = net(bias=True)
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    torch_prune.l1_unstructured(model[0], "bias", 0.5)
    torch_prune.random_unstructured(model[2], "bias", 0.5)  # a bias mask alone: the layer is changed too
    assert set(masks.get_masks(model)) == {"0"}  # weight masks by layer name, as its callers read them
    x = torch.randn(3, 5)
    expected = model(x)
    assert remove_masks(model) == ["0", "2"]
    assert [name for name, _ in model.named_parameters()] == [f"{i}.{t}" for i in (0, 2, 4) for t in ("weight", "bias")]
    assert not list(model.buffers()) and not masks.has_pruning_hooks(model)
    assert int((model[0].bias == 0).sum()) == 2 and int((model[2].bias == 0).sum()) >= 1
    torch.testing.assert_close(model(x), expected)


def test_remove_masks_refuses_a_bias_mask_without_its_hook() -> None:
    model = net(bias=True)
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    torch_prune.l1_unstructured(model[2], "bias", 0.5)
    model[2]._forward_pre_hooks.clear()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="layer '2' has bias_orig and bias_mask but no torch.nn.utils.prune hook"):
        remove_masks(model)
    assert_unchanged(before, model)


def test_remove_masks_refuses_a_mask_without_its_hook() -> None:
    model = net()
    install_mask(model[0], torch.ones(4, 5))
    install_mask(model[2], torch.ones(3, 4))
    model[2]._forward_pre_hooks.clear()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="layer '2' has weight_orig and weight_mask but no torch.nn.utils.prune hook"):
        remove_masks(model)
    assert_unchanged(before, model)


def test_remove_masks_leaves_the_other_holder_of_a_tied_weight_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    """A mask on a tied head is folded into a weight of the head's own: the embedding keeps its values."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    values = embed.weight.detach().clone()
    torch_prune.l1_unstructured(head, "weight", 0.5)
    masked = head.weight.detach().clone()
    assert remove_masks(model) == ["head"]
    assert torch.equal(embed.weight, values)
    assert torch.equal(head.weight, masked) and int((head.weight == 0).sum()) == 80
    assert "its pruned 'weight' is shared with embed.weight" in caplog.text
