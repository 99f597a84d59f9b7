"""The exported model computes what the given one computes: tied weights, hooks, re-parametrised
weights and training modes; timing runs no user hooks; the CLI's size wording."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from ecp_fast.apps import export_command
from ecp_fast.export import csr_linear, export, exported_layers, is_csr_linear, load_compact, save_compact
from ecp_fast.export.csr import dense_linear, replace_with_csr
from ecp_fast.export.measure import time_forms

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


class TiedLM(nn.Module):
    """An embedding whose matrix is also the (bias-free) output head's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


class TiedLinears(nn.Module):
    """Two nn.Linear layers given one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def tied_lm() -> TiedLM:
    """A TiedLM whose head alone is masked (half its weights)."""
    torch.manual_seed(0)
    model = TiedLM().eval()
    prune.l1_unstructured(model.head, "weight", 0.5)
    return model


FORMAT_ARGUMENTS = {"dense": {}, "csr": {"max_density": 1.0}}


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_a_mask_on_one_holder_of_a_tied_weight_leaves_the_other_holder(
    fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tied_lm()
    ids = torch.randint(0, 20, (2, 5))
    before = state_of(model)
    embedding = model.emb.weight.detach().clone()
    with torch.no_grad():
        reference = model(ids)
    with caplog.at_level(logging.WARNING, logger="ecp_fast.export"):
        exported = export(model, fmt, **FORMAT_ARGUMENTS[fmt])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(exported.emb.weight, embedding)  # the embedding keeps its values, zeros included
    # The warning names the layer and the other holder.
    assert any("'head'" in record.message and "emb.weight" in record.message for record in caplog.records)
    # The caller's model is not changed: same values, and its tie is intact.
    assert all(torch.equal(value, state_of(model)[key]) for key, value in before.items())
    assert model.emb.weight is model.head.weight_orig


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_two_linears_sharing_a_parameter_one_masked(fmt: str) -> None:
    torch.manual_seed(0)
    model = TiedLinears().eval()
    prune.random_unstructured(model.a, "weight", 0.9)
    unmasked = model.b.weight.detach().clone()
    x = torch.randn(3, 8)
    with torch.no_grad():
        reference = model(x)
        exported = export(model, fmt, **FORMAT_ARGUMENTS[fmt])
        torch.testing.assert_close(exported(x), reference, rtol=1e-5, atol=1e-6)
    holder = dense_linear(exported.b) if is_csr_linear(exported.b) else exported.b
    assert torch.equal(holder.weight, unmasked)


def test_two_masked_holders_of_one_weight_keep_their_own_masks() -> None:
    torch.manual_seed(0)
    model = TiedLinears().eval()
    prune.random_unstructured(model.a, "weight", 0.5)
    prune.random_unstructured(model.b, "weight", 0.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(export(model, "dense")(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_compact_file_of_a_tied_model_loads_into_a_tied_template() -> None:
    model = tied_lm()
    ids = torch.randint(0, 20, (2, 5))
    buffer = io.BytesIO()
    save_compact(model, buffer)
    buffer.seek(0)
    template = TiedLM()
    loaded = load_compact(buffer, template, "dense").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-6)
    assert template.emb.weight is template.head.weight  # the template is not changed


def hooked_model() -> tuple[nn.Sequential, list[torch.Size]]:
    """Three pruned Linear layers: the first with a forward hook recording its outputs' shapes, the
    second with a forward pre-hook that changes its input, the third without hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    for index in (0, 2, 4):
        prune.random_unstructured(model[index], "weight", 0.95)
    seen: list[torch.Size] = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    model[2].register_forward_pre_hook(lambda module, args: (args[0] * 0.5 + 1.0,))
    return model, seen


def test_csr_export_keeps_the_layer_hooks(caplog: pytest.LogCaptureFixture) -> None:
    model, seen = hooked_model()
    x = torch.randn(4, 8)
    with torch.no_grad():
        reference = model(x)
    with caplog.at_level(logging.WARNING, logger="ecp_fast.export"):
        exported = export(model, "csr", max_density=1.0)
    assert exported_layers(exported) == {"0": "dense", "2": "dense", "4": "csr"}
    calls = len(seen)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), reference, rtol=1e-5, atol=1e-6)
    assert len(seen) == calls + 1  # the exported layer still runs the forward hook
    warned = [record.message for record in caplog.records if "hooks of a replaced Linear" in record.message]
    assert len(warned) == 2 and "'0'" in warned[0] and "'2'" in warned[1]


def test_replace_with_csr_leaves_a_named_hooked_layer_dense() -> None:
    model, _ = hooked_model()
    x = torch.randn(4, 8)
    with torch.no_grad():
        reference = model(x)
        exported = export(model, "dense")
        replace_with_csr(exported, ["0", "2", "4"])
        torch.testing.assert_close(exported(x), reference, rtol=1e-5, atol=1e-6)
    assert exported_layers(exported) == {"0": "dense", "2": "dense", "4": "csr"}


def test_measuring_runs_the_user_hooks_only_in_the_forward_pass_it_needs(one_thread: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    prune.random_unstructured(model[0], "weight", 0.95)
    calls = []
    model[0].register_forward_hook(lambda module, args, output: calls.append(1))
    exported = export(model, "csr", example_inputs=torch.randn(4, 8))
    assert len(calls) == 1  # one run captures the layer inputs; no timing call runs the hook
    exported(torch.randn(2, 8))
    assert len(calls) == 2  # the exported layer keeps its hook


def test_time_forms_runs_no_module_hooks() -> None:
    dense = nn.Linear(8, 8)
    sparse = csr_linear(dense)
    calls = []
    for module in (dense, sparse):
        module.register_forward_pre_hook(lambda module, args: calls.append("pre"))
        module.register_forward_hook(lambda module, args, output: calls.append("post"))
    dense_seconds, csr_seconds = time_forms(dense, sparse, torch.randn(2, 8), rounds=3)
    assert calls == [] and dense_seconds > 0 and csr_seconds > 0


@pytest.mark.parametrize("training", [False, True])
def test_converted_layers_keep_the_training_mode(training: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).train(training)
    prune.random_unstructured(model[0], "weight", 0.8)
    exported = export(model, "csr", max_density=1.0)
    assert set(exported_layers(exported).values()) == {"csr"}
    assert [module.training for module in exported.modules()] == [training] * 4
    back = export(exported, "dense")
    assert [module.training for module in back.modules()] == [training] * 4
    linear = nn.Linear(4, 4).train(training)
    assert csr_linear(linear).training is training
    assert dense_linear(csr_linear(linear)).training is training


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm"])
def test_a_reparametrised_weight_stays_dense(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    getattr(torch.nn.utils, kind)(model[0])
    model.eval()
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING, logger="ecp_fast.export"):
        exported = export(model, "csr", max_density=1.0)  # before any forward pass: `weight` is stale
    assert exported_layers(exported) == {"0": "dense", "2": "csr"}
    assert any("'0' stays dense" in record.message and "re-parametrised" in record.message for record in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_size_comparison_words() -> None:
    assert export_command.size_comparison(100, 250) == "2.50x smaller than"
    assert export_command.size_comparison(114, 100) == "1.14x larger than"
    assert export_command.size_comparison(100, 100) == "the same size as"


def serialized_bytes(value: object) -> int:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return len(buffer.getvalue())


def test_the_command_says_larger_when_the_compact_file_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))  # no zeros: the compact file only adds its own entries
    compact_bytes = save_compact(model, io.BytesIO())
    assert compact_bytes > serialized_bytes(export(model, "dense").state_dict())  # the case this test is about
    checkpoint = tmp_path / "dense.pt"
    torch.save(model.state_dict(), checkpoint)
    parser = argparse.ArgumentParser(prog="ecp-fast export")
    export_command.add_arguments(parser)
    arguments = [str(checkpoint), "--arch", "mlp:4,4", "--batch", "1", "--rounds", "2", "--formats", "dense"]
    assert export_command.run(parser.parse_args(arguments)) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("compact file"))
    assert f"{compact_bytes:,} bytes" in line
    assert "x larger than the dense state dict" in line and "smaller" not in line
