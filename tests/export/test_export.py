"""export(): dense / CSR / 2:4 formats, the plain-torch claim, compact files and clear errors."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import ecp_fast
from ecp_fast.export import (
    choose_csr_layers,
    csr_linear,
    export,
    exported_layers,
    interleaved_times,
    is_csr_linear,
    load_compact,
    modelled_max_density,
    save_compact,
)
from ecp_fast.export.csr import MIN_CSR_WEIGHTS
from ecp_fast.export.semi_structured import semi_structured_available

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


def pruned(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    """``model`` magnitude-pruned per layer through torch.nn.utils.prune masks."""
    ecp_fast.prune(model, None, sparsity=sparsity, method="magnitude", scope="layer", progress=False)
    return model


class Mixed(nn.Module):
    """Conv2d -> ReLU -> flatten -> Linear (bias) -> ReLU -> Linear (no bias) -> unpruned Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 33)
        self.fc2 = nn.Linear(33, 17, bias=False)
        self.head = nn.Linear(17, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(hidden)))))


def mixed_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    # Prune conv, fc1 and fc2; the head stays unpruned (dense weights, no mask).
    ecp_fast.prune(
        model, None, sparsity=0.8, method="magnitude", scope="layer", layers=["conv", "fc1", "fc2"], progress=False
    )
    return model


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    # CSR sums the kept products in another order than the dense GEMM.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(7, 37), (2, 3, 37), (37,), (0, 37)], ids=["2d", "leading", "1d", "empty"])
def test_csr_linear_matches_masked(dtype: torch.dtype, bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    model = pruned(nn.Sequential(nn.Linear(37, 23, bias=bias)).to(dtype), 0.85)
    x = torch.randn(shape, dtype=dtype)
    exported = export(model, "csr", max_density=1.0)
    assert exported_layers(exported) == {"0": "csr"}
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(exported(x), expected, **tolerance(dtype))
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), expected, **tolerance(dtype))
    assert exported[0].weight_values.dtype == dtype and exported[0].weight_col_indices.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_mixed_model_matches_and_input_unchanged(dtype: torch.dtype, fmt: str) -> None:
    model = mixed_model(dtype)
    before = state_of(model)
    hooks = {name: len(module._forward_pre_hooks) for name, module in model.named_modules()}
    x = torch.randn(5, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    exported = export(model, fmt, **({"max_density": 0.5} if fmt == "csr" else {}))
    kinds = exported_layers(exported)
    assert kinds["conv"] == "dense" and kinds["head"] == "dense"  # Conv2d stays dense; the head has no zeros
    assert kinds["fc1"] == kinds["fc2"] == ("csr" if fmt == "csr" else "dense")
    for module in exported.modules():
        assert not any(name.endswith(("_orig", "_mask")) for name, _ in module.named_parameters(recurse=False))
        assert not any(name.endswith("_mask") for name, _ in module.named_buffers(recurse=False))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected, **tolerance(dtype))
    after = model.state_dict()
    assert before.keys() == after.keys() and "fc1.weight_mask" in after
    for key, value in before.items():
        assert torch.equal(value, after[key]) and value.dtype == after[key].dtype, key
    assert hooks == {name: len(module._forward_pre_hooks) for name, module in model.named_modules()}


def test_dense_export_is_prune_remove() -> None:
    model = mixed_model()
    reference = mixed_model()  # same seed, same masks
    ecp_fast.remove_masks(reference)
    exported = export(model, "dense")
    assert exported.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key
    assert type(exported.fc1) is nn.Linear and type(exported.conv) is nn.Conv2d


def test_csr_back_to_dense_and_unpruned_layer() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 4))  # not pruned at all
    x = torch.randn(3, 20)
    exported = export(model, "csr", max_density=1.0)  # forced: a dense weight in CSR form is still correct
    assert exported_layers(exported) == {"0": "csr", "2": "csr"}
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    assert exported_layers(export(model, "csr")) == {"0": "dense", "2": "dense"}  # modelled: dense wins
    back = export(exported, "dense")
    assert all(type(module) is nn.Linear for module in (back[0], back[2]))
    assert torch.equal(back[0].weight, model[0].weight) and torch.equal(back[2].bias, model[2].bias)


def test_modelled_and_measured_choices(one_thread: None) -> None:
    assert modelled_max_density(10, 100) == 0.0
    assert modelled_max_density(300, 784) == pytest.approx(0.10)
    assert modelled_max_density(4096, 4096) == pytest.approx(0.15)
    torch.manual_seed(3)
    model = pruned(nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10), nn.BatchNorm1d(10)), 0.95)
    model[3].train()
    assert 512 * 256 >= MIN_CSR_WEIGHTS > 256 * 10
    folded = export(model, "dense")
    modelled = choose_csr_layers(folded)
    assert modelled["0"].csr and not modelled["2"].csr and "modelled" in modelled["0"].reason
    running_mean = folded[3].running_mean.clone()
    measured = choose_csr_layers(folded, example_inputs=torch.randn(64, 512), rounds=2)
    assert measured["0"].dense_seconds > 0 and measured["0"].csr_seconds > 0 and "measured" in measured["0"].reason
    assert torch.equal(folded[3].running_mean, running_mean) and folded[3].training  # measuring ran in eval mode
    forced = choose_csr_layers(folded, max_density=0.0)
    assert not any(choice.csr for choice in forced.values())


def test_attention_projection_and_subclasses_stay_dense() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.ModuleDict(
        {"attention": nn.MultiheadAttention(16, 2), "sub": MyLinear(16, 16), "plain": nn.Linear(16, 16)}
    )
    assert exported_layers(export(model, "csr", max_density=1.0)) == {
        "attention.out_proj": "dense",
        "sub": "dense",
        "plain": "csr",
    }


def test_shared_layer_stays_shared() -> None:
    layer = nn.Linear(8, 8)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    exported = export(model, "csr", max_density=1.0)
    assert is_csr_linear(exported[0]) and exported[0] is exported[2]


def test_torch_save_load_and_deepcopy(tmp_path: Path) -> None:
    model = mixed_model()
    exported = export(model, "csr", max_density=0.5)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = exported(x)
        path = tmp_path / "model.pt"
        torch.save(exported, path)
        assert torch.equal(torch.load(path, weights_only=False)(x), expected)
        assert torch.equal(copy.deepcopy(exported)(x), expected)
        state_path = tmp_path / "state.pt"
        torch.save(exported.state_dict(), state_path)
        fresh = export(mixed_model(), "csr", max_density=0.5)
        fresh.load_state_dict(torch.load(state_path, weights_only=True))  # only strided tensors in the state dict
        assert torch.equal(fresh(x), expected)
    loaded = torch.load(path, weights_only=False)
    loaded.fc1.weight_values.data.zero_()  # the reloaded layer reads its live parameters, not a frozen copy
    assert not torch.equal(loaded(x), expected)


def test_a_loaded_csr_export_exports_and_saves_again(tmp_path: Path) -> None:
    """torch.load keeps a CSR layer's in_features but not its meta, so a deep copy of it (each export
    makes one) dropped in_features, and re-exporting or saving it compactly failed."""
    model = mixed_model()
    exported = export(model, "csr", max_density=0.5)
    path = tmp_path / "model.pt"
    torch.save(exported, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = exported(x)
        for again in (export(loaded, "dense"), export(loaded, "csr", max_density=0.5), copy.deepcopy(loaded)):
            torch.testing.assert_close(again(x), expected, rtol=1e-6, atol=1e-6)
        buffer = io.BytesIO()
        save_compact(loaded, buffer)
        buffer.seek(0)
        torch.testing.assert_close(load_compact(buffer, mixed_model(), "dense")(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("file_dtype,template_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32)])
def test_a_bias_the_template_lacks_takes_the_templates_dtype(file_dtype, template_dtype) -> None:
    """Compensation adds a bias to a bias-free layer; loading it into a template of another dtype gave
    that bias the file's dtype, and the forward pass failed."""

    def net() -> nn.Sequential:
        return nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4))

    model = net().to(file_dtype)
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    model[0].bias = nn.Parameter(torch.randn(8, dtype=file_dtype))
    buffer = io.BytesIO()
    save_compact(model, buffer)
    buffer.seek(0)
    loaded = load_compact(buffer, net().to(template_dtype), "dense")
    assert loaded[0].bias.dtype == template_dtype and torch.equal(loaded[0].bias, model[0].bias.to(template_dtype))
    assert loaded(torch.randn(2, 8, dtype=template_dtype)).dtype == template_dtype


def test_a_modules_extra_state_is_saved_and_loaded_compactly() -> None:
    class WithExtraState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.extra = {"scale": 2}

        def get_extra_state(self) -> dict:
            return self.extra

        def set_extra_state(self, state: dict) -> None:
            self.extra = state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.extra["scale"]

    model = WithExtraState()
    model.extra = {"scale": 3}
    buffer = io.BytesIO()
    save_compact(model, buffer)
    buffer.seek(0)
    loaded = load_compact(buffer, WithExtraState(), "dense")
    assert loaded.extra == {"scale": 3} and torch.equal(loaded.linear.weight, model.linear.weight)


def test_loads_in_a_process_that_never_imports_ecp_fast(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = pruned(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 6, bias=False)), 0.9)
    exported = export(model, "csr", max_density=1.0)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        torch.save({"x": x, "y": exported(x)}, tmp_path / "io.pt")
    torch.save(exported, tmp_path / "model.pt")
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "ecp_fast":
                    raise ImportError("ecp_fast must not be imported")
        sys.meta_path.insert(0, Block())
        import torch
        model = torch.load("model.pt", weights_only=False)
        data = torch.load("io.pt", weights_only=True)
        with torch.inference_mode():
            assert torch.equal(model(data["x"]), data["y"])
        assert not any(name.startswith("ecp_fast") for name in sys.modules)
        print("ok", type(model[0]).__mro__[1].__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok GraphModule"


@pytest.mark.parametrize("target", ["path", "buffer"])
def test_compact_round_trip(tmp_path: Path, target: str) -> None:
    model = mixed_model()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    file: Path | io.BytesIO = tmp_path / "model.ecp" if target == "path" else io.BytesIO()
    written = save_compact(model, file)
    if isinstance(file, io.BytesIO):
        assert written == len(file.getvalue())
        file.seek(0)
    else:
        assert written == file.stat().st_size
    template = Mixed()  # fresh random weights, no masks
    loaded = load_compact(file, template, "csr", max_density=0.5)
    assert exported_layers(loaded)["fc1"] == "csr"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    if isinstance(file, io.BytesIO):
        file.seek(0)
    as_dense = load_compact(file, mixed_model(), "dense")  # a pruned template: its masks are folded
    with torch.no_grad():
        torch.testing.assert_close(as_dense(x), expected, rtol=0, atol=0)


def test_compact_file_is_small_with_narrow_indices(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = pruned(nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 200)), 0.95)
    path = tmp_path / "model.ecp"
    compact = save_compact(model, path)
    dense = io.BytesIO()
    torch.save(export(model).state_dict(), dense)
    assert len(dense.getvalue()) / compact > 8
    payload = torch.load(path, weights_only=True)
    assert payload["csr"]["0.weight"]["col_indices"].dtype == torch.int16  # 784 inputs
    assert payload["csr"]["2.weight"]["col_indices"].dtype == torch.uint8  # 64 inputs
    assert set(payload["dense"]) == {"0.bias", "2.bias"}


def test_compact_adds_a_compensated_bias(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = pruned(nn.Sequential(nn.Linear(12, 9, bias=False)), 0.5)
    model[0].bias = nn.Parameter(torch.randn(9))  # compensation gave the layer a bias
    save_compact(model, tmp_path / "m.ecp")
    loaded = load_compact(tmp_path / "m.ecp", nn.Sequential(nn.Linear(12, 9, bias=False)), "dense")
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_export_argument_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="argument 'model' must be a torch.nn.Module, got dict"):
        export({"weight": torch.zeros(2)}, "dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"argument 'format' must be one of \('dense', 'csr', '2:4'\), got 'coo'"):
        export(model, "coo")
    with pytest.raises(TypeError, match="argument 'format' must be a string"):
        export(model, 24)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="argument 'max_density' must be a number in"):
        export(model, "csr", max_density=1.5)
    with pytest.raises(TypeError, match="argument 'max_density'"):
        export(model, "csr", max_density="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="argument 'max_density' applies to format='csr' only, got format='2:4'"):
        export(model, "2:4", max_density=0.1)
    with pytest.raises(ValueError, match="argument 'example_inputs' applies to format='csr' and '2:4' only"):
        export(model, "dense", example_inputs=torch.randn(2, 300))
    with pytest.raises(TypeError, match="argument 'linear' must be an nn.Linear"):
        csr_linear(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32 or float64"):
        csr_linear(nn.Linear(4, 4).half())


def test_example_inputs_as_the_docstring_says(one_thread: None) -> None:
    """A tensor or a tuple of positional arguments; anything else, or a wrong shape, is refused by name."""
    model = pruned(nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 10)), 0.95)
    before = state_of(model)
    x = torch.randn(4, 300)
    for inputs in (x, (x,)):
        exported = export(model, "csr", example_inputs=inputs)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="argument 'example_inputs' must be a tensor or a tuple .*got list"):
        export(model, "csr", example_inputs=[x])
    with pytest.raises(TypeError, match="argument 'example_inputs' must be a tensor or a tuple .*got dict"):
        choose_csr_layers(export(model, "dense"), example_inputs={"input": x})
    with pytest.raises(ValueError, match=r"'example_inputs'.*shape \(4, 30\).*layer '0' expects a last size of 300"):
        export(model, "csr", example_inputs=torch.randn(4, 30))
    with pytest.raises(ValueError, match="'max_density' and 'example_inputs' exclude each other"):
        export(model, "csr", max_density=0.5, example_inputs=x)
    assert state_of(model).keys() == before.keys()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


@pytest.mark.skipif(semi_structured_available(), reason="the CPU error path runs only without a 2:4-capable GPU")
def test_two_four_on_cpu_is_a_clear_error() -> None:
    model = pruned(nn.Sequential(nn.Linear(64, 64)), 0.5)
    before = state_of(model)
    with pytest.raises(ValueError, match=r"argument 'format': '2:4' needs .*CUDA.*format='csr'"):
        export(model, "2:4")
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


@pytest.mark.skipif(not semi_structured_available(), reason="needs a GPU that runs semi-structured sparse weights")
def test_two_four_on_gpu() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).half().cuda()
    ecp_fast.Pruner(model, layers=["0"], progress=False).prune(sparsity=0.5, method="magnitude", scope="2:4")
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        expected = model(x)
        exported = export(model, "2:4")
        assert exported_layers(exported) == {"0": "2:4", "2": "dense"}
        torch.testing.assert_close(exported(x), expected, rtol=1e-2, atol=1e-2)
    assert hasattr(model[0], "weight_mask")


def test_compact_argument_and_file_errors(tmp_path: Path) -> None:
    model = pruned(nn.Sequential(nn.Linear(16, 8)), 0.9)
    good = tmp_path / "good.ecp"
    save_compact(model, good)
    with pytest.raises(TypeError, match="argument 'model' must be a torch.nn.Module"):
        save_compact("model", good)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'path' must be a path"):
        save_compact(model, 123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'path_or_file' must be a path"):
        load_compact(123, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'model_template' must be a torch.nn.Module"):
        load_compact(good, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="argument 'format'"):
        load_compact(good, model, "coo")
    with pytest.raises(FileNotFoundError):
        load_compact(tmp_path / "missing.ecp", model)
    with pytest.raises(ValueError, match="argument 'model_template' does not fit the file"):
        load_compact(good, nn.Sequential(nn.Linear(16, 9)))

    data = good.read_bytes()
    torch.save({"0.weight": torch.zeros(8, 16)}, tmp_path / "state.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    payload = torch.load(good, weights_only=True)
    payload["csr"]["0.weight"]["col_indices"] = payload["csr"]["0.weight"]["col_indices"] + 100
    torch.save(payload, tmp_path / "out_of_range.ecp")
    bad_files = {
        "garbage.ecp": b"this is not a torch file at all",
        "empty.ecp": b"",
        "truncated.ecp": data[: len(data) // 2],
    }
    for name, content in bad_files.items():
        (tmp_path / name).write_bytes(content)
    expectations = {
        "garbage.ecp": "not a readable",
        "empty.ecp": "not a readable",
        "truncated.ecp": "not a readable",
        "state.pt": "not an ecp_fast compact file",
        "module.pt": "not a readable",
        "out_of_range.ecp": "CSR record of '0.weight' is damaged",
    }
    for name, expected in expectations.items():
        with pytest.raises(ValueError, match=expected) as caught:
            load_compact(tmp_path / name, model)
        assert "argument 'path_or_file'" in str(caught.value), name
        error = caught.value  # no chained traceback from pickle or zip internals
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), name


def test_interleaved_times_and_csr_speed_ratio(one_thread: None) -> None:
    """CSR at 2% density beats dense on a 1024x1024 layer (measured 6-11x; asserted as a ratio > 1.5)."""
    torch.manual_seed(8)
    layer = nn.Linear(1024, 1024)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.02)
    sparse = csr_linear(layer)
    x = torch.randn(64, 1024)
    with torch.no_grad():
        times = interleaved_times({"dense": lambda: layer(x), "csr": lambda: sparse(x)}, rounds=5)
    assert all(t.rounds == 5 and 0 < t.minimum <= t.median for t in times.values())
    assert times["dense"].minimum / times["csr"].minimum > 1.5
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times({"x": lambda: None}, rounds=0)


def test_interleaved_times_quantiles_and_untimed_setup() -> None:
    """Setup runs before each warm-up call and each burst, outside the timed span; quantiles are ordered."""
    events: list[str] = []
    fresh: dict[str, list[int]] = {}

    def setup(name: str) -> None:
        events.append(f"setup {name}")
        fresh[name] = []

    def call(name: str) -> None:
        assert fresh[name] == [], "a call must see the copy its setup made"
        fresh[name].append(1)
        events.append(f"call {name}")

    calls = {name: partial(call, name) for name in ("a", "b")}
    times = interleaved_times(
        calls, rounds=4, warmup=2, burst=1, setup={name: partial(setup, name) for name in ("a", "b")}
    )
    warmup = ["setup a", "call a"] * 2 + ["setup b", "call b"] * 2
    assert events == warmup + ["setup a", "call a", "setup b", "call b"] * 4
    for timing in times.values():
        assert timing.rounds == 4
        assert 0 < timing.minimum <= timing.q20 <= timing.median <= timing.q80


def test_choose_csr_layers_refuses_what_export_refuses() -> None:
    model = mixed_model()
    with pytest.raises(TypeError, match=r"argument 'max_density' must be a float in \[0, 1\] or None, got bool"):
        choose_csr_layers(model, max_density=True)
    with pytest.raises(TypeError, match=r"argument 'max_density' must be a float in \[0, 1\] or None, got str"):
        choose_csr_layers(model, max_density="0.5")
    with pytest.raises(ValueError, match=r"argument 'max_density' must be a number in \[0, 1\] or None, got 1.5"):
        choose_csr_layers(model, max_density=1.5)
