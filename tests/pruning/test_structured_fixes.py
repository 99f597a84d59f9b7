"""Structured pruning: requires_grad kept, gated MLPs refused, the report's bias change, GPT-2, shared layers."""

from __future__ import annotations

import copy

import pytest
import torch
from fingerprint import assert_unchanged, fingerprint
from torch import nn

from ecp_fast import Pruner
from ecp_fast.pruning.masks import copy_model
from ecp_fast.pruning.structured import (
    NeuronPair,
    find_neuron_pairs,
    linear_flops,
    mask_neurons,
    plan_neurons,
    prune_neurons,
)

transformers = pytest.importorskip("transformers")


def inputs(n: int = 64, features: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


# ---- requires_grad -------------------------------------------------------------------------------


def with_norms() -> nn.Sequential:
    """Linear -> BatchNorm1d -> PReLU(H) -> Linear -> ReLU -> bias-free Linear: every builder is used."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 20),
        nn.BatchNorm1d(20),
        nn.PReLU(20),
        nn.Linear(20, 14),
        nn.ReLU(),
        nn.Linear(14, 5, bias=False),
    ).double()


@pytest.mark.parametrize("frozen", [(), ("0.bias", "1.weight", "3.weight", "5.weight"), ("2.weight", "3.bias")])
def test_shrunk_parameters_keep_requires_grad(frozen: tuple[str, ...]) -> None:
    model = with_norms()
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    before = flags(model)
    x = inputs()
    report = prune_neurons(model, 0.5, method="ecp", batches=[x])  # compensated: '5' gains a bias
    assert model[0].out_features < 20 and model[3].out_features < 14 and model[5].bias is not None
    after = flags(model)
    assert after == {**before, "5.bias": before["5.weight"]}
    model.train()
    model(x).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == after[name], name
    assert report.compensated


def test_masked_layers_keep_requires_grad_of_weight_orig() -> None:
    model = with_norms().eval()
    x = inputs()
    pruner = Pruner(model, progress=False)
    pruner.calibrate([x])
    pruner.prune(0.3, method="ecp")
    assert hasattr(model[3], "weight_orig") and model[3].weight_orig.requires_grad
    prune_neurons(model, 0.25, method="norm")
    assert hasattr(model[3], "weight_orig") and model[3].weight_orig.requires_grad
    assert model[0].weight_orig.requires_grad and model[0].bias.requires_grad


def test_mask_neurons_new_bias_follows_the_weight() -> None:
    model = with_norms().eval()
    model[5].weight.requires_grad_(False)
    x = inputs()
    pruner = Pruner(model, progress=False)
    pruner.calibrate([x])
    plan = plan_neurons(model, 0.5, "ecp", "global", None, pruner.statistics)
    mask_neurons(model, plan)
    assert model[5].bias is not None and not model[5].bias.requires_grad


# ---- gated MLPs ----------------------------------------------------------------------------------


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


MLP = "model.layers.0.mlp."


@pytest.mark.parametrize(
    "pairs",
    [None, [(MLP + "up_proj", MLP + "down_proj")], [(MLP + "gate_proj", MLP + "down_proj")]],
)
@pytest.mark.parametrize("method", ["ecp", "norm"])
def test_llama_gated_mlp_is_refused_and_left_untouched(pairs: list[tuple[str, str]] | None, method: str) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"argument 'pairs'.*gated MLP: '.*(gate|up)_proj'.*multiplies the hidden"):
        prune_neurons(model, 0.5, method=method, pairs=pairs, batches=[{"input_ids": ids}])
    assert_unchanged(before, model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert find_neuron_pairs(model) == []


class GatedBlock(nn.Module):
    """Mixtral-style expert: w2(silu(w1(x)) * w3(x)), names that say nothing about the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(8, 24)
        self.w3 = nn.Linear(8, 24)
        self.w2 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class PlainBlock(nn.Module):
    """fc2(gelu(fc1(x))) + proj(x): a third Linear of another shape is no gate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 24)
        self.fc2 = nn.Linear(24, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x))) + self.proj(x)


def test_gate_found_by_shape_and_plain_block_accepted() -> None:
    gated = GatedBlock()
    before = fingerprint(gated)
    with pytest.raises(ValueError, match=r"pair \('w3', 'w2'\) belongs to a gated MLP: 'w1'"):
        prune_neurons(gated, 0.5, method="norm", pairs=[("w3", "w2")])
    assert_unchanged(before, gated)
    plain = PlainBlock()
    assert find_neuron_pairs(plain) == [NeuronPair("fc1", "fc2")]
    prune_neurons(plain, 0.5, method="norm")
    assert plain.fc1.out_features == 12 and plain.fc2.in_features == 12


# ---- the report ----------------------------------------------------------------------------------


def test_report_bias_change_counts_the_rows_the_model_keeps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 14), nn.ReLU(), nn.Linear(14, 5)).double()
    original = copy.deepcopy(model)
    report = prune_neurons(model, 0.5, method="ecp", batches=[inputs()])
    kept_rows = report.plan.keep["4"]  # rows of '2' that pair ('2', '4') keeps
    assert not bool(kept_rows.all())
    actual_2 = float((model[2].bias - original[2].bias[kept_rows]).detach().abs().sum())
    actual_4 = float((model[4].bias - original[4].bias).detach().abs().sum())
    assert actual_2 > 0 and actual_4 > 0
    assert report.pairs[0].bias_change_l1 == pytest.approx(actual_2, rel=1e-12)
    assert report.pairs[1].bias_change_l1 == pytest.approx(actual_4, rel=1e-12)
    assert report.to_rows()[0]["bias_change_l1"] == pytest.approx(actual_2, rel=1e-12)


# ---- GPT-2 (Conv1D) ------------------------------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


GPT2_PAIRS = [NeuronPair(f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj") for i in range(2)]


@pytest.mark.parametrize("method", ["ecp", "local", "norm_io"])
@pytest.mark.parametrize("explicit", [False, True])
def test_gpt2_conv1d_mlp_shrinks_like_the_masked_model(method: str, explicit: bool) -> None:
    model = tiny_gpt2()
    assert find_neuron_pairs(model) == GPT2_PAIRS
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    pairs = [(pair.producer, pair.consumer) for pair in GPT2_PAIRS] if explicit else None
    reference = copy.deepcopy(model)
    flops_before = linear_flops(model)
    report = prune_neurons(model, 0.5, method=method, scope="layer", pairs=pairs, batches=batches)
    mask_neurons(reference, report.plan)
    conv1d = transformers.pytorch_utils.Conv1D
    for block in model.transformer.h:
        assert isinstance(block.mlp.c_fc, conv1d) and isinstance(block.mlp.c_proj, conv1d)
        assert block.mlp.c_fc.weight.shape == (16, 32) and block.mlp.c_fc.nf == 32
        assert block.mlp.c_proj.weight.shape == (32, 16) and block.mlp.c_fc.weight.requires_grad
    assert report.hidden_before == 128 and report.hidden_after == 64
    assert report.flops_after == linear_flops(model) < flops_before == report.flops_before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert report.compensated == (method != "norm_io")


def test_gpt2_masked_conv1d_keeps_its_sliced_mask() -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    pruner = Pruner(model, progress=False)
    pruner.calibrate([{"input_ids": ids}])
    pruner.prune(0.5, method="ecp")
    c_proj = model.transformer.h[0].mlp.c_proj
    zeros = c_proj.weight_mask == 0  # (in, out): rows are the hidden units
    reference = copy_model(model)  # deepcopy cannot copy a masked weight
    pruner.calibrate([{"input_ids": ids}])
    report = prune_neurons(pruner, 0.25, method="ecp", scope="layer")
    mask_neurons(reference, report.plan)
    c_proj = model.transformer.h[0].mlp.c_proj
    assert torch.equal(c_proj.weight_mask == 0, zeros[report.plan.keep[GPT2_PAIRS[0].consumer]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# ---- shared layers -------------------------------------------------------------------------------


def used_twice() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 4)).double()


def tied() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    model[2].weight = model[0].weight
    return model


@pytest.mark.parametrize("build", [used_twice, tied])
@pytest.mark.parametrize("method", ["ecp", "norm"])
@pytest.mark.parametrize("explicit", [False, True])
def test_shared_layers_are_refused_naming_pairs(build, method: str, explicit: bool) -> None:
    model = build()
    before = fingerprint(model)
    pairs = [("0", "2")] if explicit else None
    x = inputs(features=8)
    with pytest.raises(ValueError, match=r"argument 'pairs'.*shares its weight with") as raised:
        prune_neurons(model, 0.5, method=method, pairs=pairs, batches=[x])
    assert "'layers'" not in str(raised.value)
    assert_unchanged(before, model)
