"""Which layers are scored and how their weights read as (out, in): Conv1D, tied weights, heads, exclude."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from ecp_fast.ops import reference
from ecp_fast.pruning.calibration import Calibrator
from ecp_fast.pruning.layers import (
    LayerSpec,
    is_transposed_linear,
    output_heads,
    resolve_layers,
    tied_weights,
    weight_2d,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def conv1d_class() -> type[nn.Module]:
    """transformers' Conv1D when installed, else a stand-in with the same class name, module and layout."""
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:

        class Conv1D(nn.Module):
            def __init__(self, nf: int, nx: int) -> None:
                super().__init__()
                self.nf, self.nx = nf, nx
                self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
                self.bias = nn.Parameter(torch.zeros(nf))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)

        Conv1D.__module__ = "transformers.pytorch_utils"
        return Conv1D


def conv1d_mlp(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """A Conv1D MLP and the same function built from nn.Linear (weights transposed), float64."""
    torch.manual_seed(seed)
    conv1d = conv1d_class()
    first, second = conv1d(9, 5), conv1d(3, 9)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.normal_(0, 0.4)
            layer.bias.normal_(0, 0.1)
    model = nn.Sequential(first, nn.Tanh(), second).double()
    linear = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    with torch.no_grad():
        for source, target in ((model[0], linear[0]), (model[2], linear[2])):
            target.weight.copy_(source.weight.t())
            target.bias.copy_(source.bias)
    return model, linear


# ---- Conv1D ---------------------------------------------------------------------------------------


def test_conv1d_spec_gives_the_out_in_view_and_writes_through():
    model, _ = conv1d_mlp()
    layer = model[0]
    assert is_transposed_linear(layer) and not is_transposed_linear(nn.Linear(2, 3))
    specs = resolve_layers(model)
    assert list(specs) == ["0", "2"]
    spec = specs["0"]
    assert spec.kind == "conv1d" and (spec.fan_out, spec.fan_in) == (9, 5)
    torch.testing.assert_close(spec.weight_view(), layer.weight.t())
    torch.testing.assert_close(weight_2d(layer), layer.weight.detach().t())
    assert weight_2d(layer).is_contiguous()
    with torch.no_grad():
        spec.weight_view()[2, 4] = 0.0  # output 2, input 4
    assert layer.weight[4, 2] == 0
    mask = torch.rand(9, 5) > 0.5
    stored = spec.mask_to_weight_shape(mask)
    assert stored.shape == layer.weight.shape and stored.is_contiguous()
    torch.testing.assert_close(spec.as_2d(stored), mask)
    with pytest.raises(ValueError, match=r"shape \(9, 5\)"):
        spec.mask_to_weight_shape(mask.t())


def test_conv1d_calibrates_like_the_equivalent_linear():
    model, linear = conv1d_mlp()
    x = torch.randn(4, 6, 5, dtype=torch.float64)  # (batch, tokens, in)
    torch.testing.assert_close(model(x), linear(x))
    for sensitivity in ("output", "local"):
        conv_pruner = ecp_fast.Pruner(model, sensitivity=sensitivity, progress=False)
        linear_pruner = ecp_fast.Pruner(linear, sensitivity=sensitivity, progress=False)
        conv_pruner.calibrate([x[:2], x[2:]])
        linear_pruner.calibrate([x[:2], x[2:]])
        for name in ("0", "2"):
            for actual, expected in zip(
                conv_pruner.statistics[name].moments, linear_pruner.statistics[name].moments, strict=True
            ):
                torch.testing.assert_close(actual, expected)
    gradients = Calibrator(model, resolve_layers(model)).gradients(x)
    expected = reference.sensitivities(linear, x)
    for name in ("0", "2"):
        torch.testing.assert_close(gradients[name].x, expected[name].x)
        torch.testing.assert_close(gradients[name].g, expected[name].g)


def test_masked_conv1d_weight_reads_through_the_mask():
    model, _ = conv1d_mlp()
    spec = resolve_layers(model)["0"]
    keep = torch.rand(9, 5) > 0.3
    ecp_fast.pruning.masks.install_mask(spec.module, spec.mask_to_weight_shape(keep).double())
    torch.testing.assert_close(spec.mask_2d(), keep.double())
    torch.testing.assert_close(spec.weight_2d(), spec.weight_view().detach() * keep)


# ---- tied weights and output heads ---------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding, two hidden layers and a head named lm_head, optionally tied to the embedding."""

    def __init__(self, tie: str | None = None, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie == "same":
            self.lm_head.weight = self.embed.weight
        elif tie == "storage":  # a different Parameter over the same memory
            self.lm_head.weight = nn.Parameter(self.embed.weight.data)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(self.embed(ids)))


@pytest.mark.parametrize("tie", ["same", "storage"])
def test_tied_head_is_left_out_and_refused_by_name(tie):
    model = TinyLM(tie=tie)
    assert tied_weights(model)["lm_head"] == ["embed.weight"]
    assert list(resolve_layers(model)) == ["body.0", "body.2"]
    assert list(resolve_layers(model, include_output_head=True)) == ["body.0", "body.2"]  # tied: never
    with pytest.raises(ValueError, match=r"'lm_head' has its weight or bias tied to embed.weight"):
        resolve_layers(model, ["body.0", "lm_head"])


def test_pruning_never_changes_a_tied_embedding():
    model = TinyLM(tie="same")
    embedding = model.embed.weight.detach().clone()
    ids = torch.randint(0, 11, (4, 7))
    ecp_fast.prune(model, [ids], sparsity=0.5, method="ecp", scope="layer", sensitivity="output", progress=False)
    torch.testing.assert_close(model.embed.weight, embedding, rtol=0, atol=0)


def test_untied_output_head_is_left_out_by_default_and_included_on_request():
    model = TinyLM()
    assert output_heads(model) == ["lm_head"]
    assert list(resolve_layers(model)) == ["body.0", "body.2"]
    assert list(resolve_layers(model, include_output_head=True)) == ["body.0", "body.2", "lm_head"]
    assert list(resolve_layers(model, ["lm_head"])) == ["lm_head"]  # named explicitly: allowed


def test_get_output_embeddings_names_the_head():
    class WithGetter(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.out = self.lm_head
            del self.lm_head

        def get_output_embeddings(self) -> nn.Module:
            return self.out

        def forward(self, ids):
            return self.out(self.body(self.embed(ids)))

    model = WithGetter()
    assert output_heads(model) == ["out"]
    assert list(resolve_layers(model)) == ["body.0", "body.2"]


# ---- exclude ----------------------------------------------------------------------------------------


def test_exclude_takes_names_and_glob_patterns_and_parents(caplog):
    model = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    )
    assert list(resolve_layers(model, exclude=["0.1"])) == ["0.0", "1.0", "1.1"]
    assert list(resolve_layers(model, exclude=["*.1"])) == ["0.0", "1.0"]
    assert list(resolve_layers(model, exclude="1")) == ["0.0", "0.1"]  # a parent leaves out its children
    assert list(resolve_layers(model, ["0.0", "1.1"], exclude=["1.*"])) == ["0.0"]
    with caplog.at_level(logging.WARNING, logger="ecp_fast.pruning.layers"):
        resolve_layers(model, exclude=["nothing.here"])
    assert "matches no module" in caplog.text
    with pytest.raises(ValueError, match="left out"):
        resolve_layers(model, exclude=["*"])
    with pytest.raises(TypeError, match="exclude"):
        resolve_layers(model, exclude=[3])


# ---- unsupported layers --------------------------------------------------------------------------------


def test_one_warning_lists_every_weight_matrix_that_cannot_be_scored(caplog):
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)  # not a layer: left out silently
            self.norm = nn.LayerNorm(4)  # 1-D weight: not a matrix
            self.conv = nn.Conv1d(4, 4, 1)
            self.grouped = nn.Conv2d(4, 4, 1, groups=2)
            self.attention = nn.MultiheadAttention(4, 2)
            self.scale = nn.Parameter(torch.ones(4, 4))  # a matrix on the model itself
            self.head = nn.Linear(4, 2)

    with caplog.at_level(logging.WARNING, logger="ecp_fast.pruning.layers"):
        specs = resolve_layers(Mixed())
    assert list(specs) == ["head"]  # MultiheadAttention never calls its out_proj
    records = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(records) == 1
    message = records[0].getMessage()
    for expected in (
        "'conv': Conv1d",
        "'grouped': Conv2d with groups=2",
        "'attention': MultiheadAttention",
        "in_proj_weight",
        "'': Mixed",
    ):
        assert expected in message, expected
    assert "embed" not in message and "norm" not in message


def test_layer_spec_keeps_its_constructor():
    linear = nn.Linear(3, 2)
    spec = LayerSpec("x", linear, "linear")
    assert (spec.fan_out, spec.fan_in) == (2, 3)
    assert spec.weight_view().data_ptr() == linear.weight.data_ptr()


def test_eval_mode_gives_every_submodule_its_own_mode_back_shared_ones_too() -> None:
    from ecp_fast.pruning.batches import eval_mode

    frozen = nn.Dropout(0.5).eval()  # shared by two parents, in eval inside a model in training
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), frozen), nn.Sequential(frozen, nn.Linear(2, 2))).train()
    frozen.eval()
    modes = [module.training for module in model.modules()]
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == modes and not frozen.training
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        raise RuntimeError("inside")
    assert [module.training for module in model.modules()] == modes


def test_zero_weights_writes_a_channels_last_weight_in_place() -> None:
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    spec = LayerSpec("conv", conv, "conv2d")
    removed = torch.rand(4, 27, generator=torch.Generator().manual_seed(0)) < 0.5
    expected = conv.weight.detach().reshape(4, 27).masked_fill(removed, 0)
    pointer = conv.weight.data_ptr()
    with torch.no_grad():
        spec.zero_weights(removed)
    assert conv.weight.data_ptr() == pointer and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(spec.weight_view(), expected)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ecp"])
def test_a_channels_last_model_prunes_as_a_contiguous_one(method: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4))
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 3, 5, 5, generator=generator), torch.randint(0, 4, (8,), generator=generator))]
    strided = copy.deepcopy(model).to(memory_format=torch.channels_last)
    ecp_fast.prune(model, batches, sparsity=0.6, method=method, progress=False)
    ecp_fast.prune(strided, batches, sparsity=0.6, method=method, progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(strided.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_a_parametrized_weight_is_skipped_or_refused_without_running_its_parametrization(caplog):
    """Reading a spectral-normed weight in train mode runs a power iteration (its buffers move): layers
    are resolved without that read, a parametrized layer is skipped with the reason, or refused by name."""

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        nn.utils.parametrizations.spectral_norm(net[2])
        return net

    net = model()
    before = copy.deepcopy(net.state_dict())
    with caplog.at_level(logging.WARNING, logger="ecp_fast.pruning.layers"):
        specs = resolve_layers(net)
    assert list(specs) == ["0"]
    message = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert "'2': ParametrizedLinear with a parametrized weight" in message and "ParametrizationList" not in message
    with pytest.raises(ValueError, match=r"argument 'layers': layer '2' cannot be pruned: .*parametrized weight"):
        resolve_layers(net, layers=["0", "2"])
    inputs, targets = torch.randn(32, 10), torch.randint(0, 3, (32,))
    report = ecp_fast.prune(net, [(inputs, targets)], sparsity=0.5, method="ecp", progress=False)
    assert [layer.name for layer in report.layers] == ["0"]
    after = net.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items() if key.startswith("2."))


def test_an_asymmetric_same_padding_is_skipped_up_front_with_its_reason(caplog):
    """padding='same' with an even kernel pads one side more, which unfold cannot: the layer is skipped
    (named when asked for) before calibration, instead of failing mid-pass without a layer name."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 4, padding="same"))
    with caplog.at_level(logging.WARNING, logger="ecp_fast.pruning.layers"):
        assert list(resolve_layers(net)) == ["0"]
    assert "'2': Conv2d with padding='same', kernel_size=(4, 4)" in caplog.text
    with pytest.raises(ValueError, match=r"layer '2' cannot be pruned: .*pads asymmetrically"):
        resolve_layers(net, layers=["2"])
    odd_dilated = nn.Conv2d(4, 4, 4, padding="same", dilation=2)  # total 6 per side pair: symmetric
    assert list(resolve_layers(nn.Sequential(odd_dilated))) == ["0"]


def _three_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=generator) + 2, torch.randint(0, 4, (32,), generator=generator))]


@pytest.mark.parametrize("method", ["ecp", "ecp-obs", "magnitude"])
def test_a_layer_whose_bias_a_mask_recomputes_is_left_out_or_refused(method: str, caplog) -> None:
    """A masked or parametrized bias is recomputed at every call: a compensation written into it would be
    lost while the report counted it. Such a layer is skipped with its reason, or refused by name."""
    net = _three_layers()
    torch.nn.utils.prune.l1_unstructured(net[0], "bias", amount=0.25)
    nn.utils.parametrize.register_parametrization(net[2], "bias", nn.Identity())
    before = copy.deepcopy(net.state_dict())
    with caplog.at_level(logging.WARNING, logger="ecp_fast.pruning.layers"):
        report = ecp_fast.prune(
            net, _data(), sparsity=0.5, method=method, progress=False, loss_fn=nn.CrossEntropyLoss()
        )
    assert [layer.name for layer in report.layers] == ["4"]
    assert "'0': Linear with a masked bias" in caplog.text and "with a parametrized bias" in caplog.text
    after = net.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items() if not key.startswith("4."))
    for name in ("0", "2"):
        with pytest.raises(ValueError, match=rf"argument 'layers': layer '{name}' cannot be pruned: .* bias"):
            resolve_layers(net, layers=[name])


def test_a_bias_shared_between_layers_counts_as_a_tie() -> None:
    """Each layer's compensation is written into its bias: a bias two layers share would take both."""
    net = _three_layers()
    net[2].bias = net[0].bias = nn.Parameter(torch.zeros(16))
    assert tied_weights(net) == {"0": ["2.bias"], "2": ["0.bias"]}
    assert list(resolve_layers(net)) == ["4"]
    with pytest.raises(ValueError, match=r"argument 'layers': layer '2' has its weight or bias tied to 0.bias"):
        resolve_layers(net, layers=["2"])
    report = ecp_fast.prune(net, _data(), sparsity=0.5, method="ecp-obs", progress=False)
    assert [layer.name for layer in report.layers] == ["4"] and torch.equal(net[0].bias, torch.zeros(16))


def test_inference_tensors_are_named_as_the_reason_nothing_can_be_pruned() -> None:
    with torch.inference_mode():
        net = _three_layers()
    with pytest.raises(ValueError, match=r"no nn.Linear.*'0' \(Linear holds inference tensors"):
        ecp_fast.prune(net, _data(), sparsity=0.5, method="sparsegpt", progress=False)


def test_a_layer_called_with_a_keyword_input_is_named_in_the_error() -> None:
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(input=x)))

    net = KeywordCall()
    before = copy.deepcopy(net.state_dict())
    for method in ("ecp", "ecp-obs"):
        with pytest.raises(ValueError, match=r"argument 'model': layer 'a' was called without its input tensor"):
            ecp_fast.prune(net, _data(), sparsity=0.5, method=method, progress=False)
        assert all(torch.equal(net.state_dict()[key], value) for key, value in before.items())
    report = ecp_fast.prune(net, _data(), sparsity=0.5, method="ecp-obs", progress=False, exclude=["a"])
    assert [layer.name for layer in report.layers] == ["b"]
