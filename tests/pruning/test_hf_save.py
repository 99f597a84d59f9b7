"""``ecp_fast.pruning.hf.save_pretrained``: a bad path is refused before the model is touched, and a
failure while saving leaves the model (and its config) and the target folder exactly as they were."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from fingerprint import assert_unchanged, fingerprint  # noqa: E402
from test_transformers import logits, quiet_transformers, tiny_gpt2, tiny_llama, token_batch  # noqa: E402, F401

from ecp_fast.pruning.hf import save_pretrained  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def pruned_llama():
    """A Llama with masks on every layer and compensation biases, which saving folds and switches on."""
    model = tiny_llama()
    batch = token_batch([10, 6])
    pruner = ecp_fast.Pruner(model, sensitivity="output", probes=2, progress=False)
    pruner.calibrate([batch])
    report = pruner.prune(0.5, method="ecp", scope="row")
    assert report.added_biases and not model.config.attention_bias and not model.config.mlp_bias
    return model, batch


def bad_paths(tmp_path: Path) -> dict[str, tuple[object, type[Exception], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    return {
        "none": (None, TypeError, r"argument 'path' must be a directory path \(str or os.PathLike\), got NoneType"),
        "bytes": (b"out", TypeError, "argument 'path' must be a directory path.*got bytes"),
        "empty": ("", ValueError, "argument 'path' must be a directory path, got an empty string"),
        "a file": (a_file, ValueError, "argument 'path': '.*a_file' is an existing file, expected a directory"),
        "below a file": (
            str(a_file / "sub" / "dir"),
            ValueError,
            "argument 'path': '.*a_file/sub/dir' cannot be a directory, since '.*a_file' is a file",
        ),
    }


@pytest.mark.parametrize("case", ["none", "bytes", "empty", "a file", "below a file"])
def test_a_bad_path_is_refused_before_the_model_is_touched(pruned_llama, tmp_path, case) -> None:
    model, _ = pruned_llama
    path, error, match = bad_paths(tmp_path)[case]
    before, config = fingerprint(model), model.config.to_dict()
    with pytest.raises(error, match=match):
        save_pretrained(model, path)  # type: ignore[arg-type]
    assert_unchanged(before, model)
    assert model.config.to_dict() == config


def test_a_failure_while_saving_restores_the_model_and_a_retry_saves_it(pruned_llama, tmp_path) -> None:
    model, batch = pruned_llama
    before, config = fingerprint(model), model.config.to_dict()
    expected = logits(model, batch)
    with pytest.raises(ValueError, match="nonsense"):  # transformers fails after the model was prepared
        save_pretrained(model, tmp_path / "first", max_shard_size="nonsense")
    assert_unchanged(before, model)
    assert model.config.to_dict() == config  # attention_bias / mlp_bias switched back off

    preparation = save_pretrained(model, tmp_path / "new" / "dir")  # parents are created
    assert preparation.config_switches == ["attention_bias", "mlp_bias"] and len(preparation.folded) == 14
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "new" / "dir").eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


def test_an_interrupted_save_restores_the_model(pruned_llama, tmp_path, monkeypatch) -> None:
    model, _ = pruned_llama
    before, config = fingerprint(model), model.config.to_dict()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, tmp_path / "out")
    assert_unchanged(before, model)
    assert model.config.to_dict() == config


# ---- the target folder after a failure -------------------------------------------------------------


def folder_contents(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), to compare a folder before and after."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def earlier_save(folder: Path) -> dict[str, bytes]:
    """A plain (unpruned, bias-free) Llama saved in shards into ``folder``, plus a file of the user's."""
    tiny_llama(seed=5).save_pretrained(folder, max_shard_size="50KB")
    (folder / "notes.txt").write_text("kept")
    contents = folder_contents(folder)
    assert "model.safetensors.index.json" in contents and len(contents) > 4
    return contents


def test_a_failing_save_into_a_new_folder_leaves_no_folder(pruned_llama, tmp_path) -> None:
    model, _ = pruned_llama
    with pytest.raises(ValueError, match="nonsense"):  # transformers has written the configs by then
        save_pretrained(model, tmp_path / "new" / "dir", max_shard_size="nonsense")
    assert sorted(os.listdir(tmp_path)) == []  # neither the folder, nor its parent, nor a temporary one


def test_a_failing_save_into_an_earlier_save_leaves_its_files_as_they_were(pruned_llama, tmp_path) -> None:
    model, _ = pruned_llama
    before = earlier_save(tmp_path / "out")
    with pytest.raises(ValueError, match="nonsense"):
        save_pretrained(model, tmp_path / "out", max_shard_size="nonsense")
    assert folder_contents(tmp_path / "out") == before  # config.json not overwritten with attention_bias=True
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failure_while_moving_the_files_in_puts_the_earlier_save_back(pruned_llama, tmp_path, monkeypatch) -> None:
    model, _ = pruned_llama
    before, fingerprint_before = earlier_save(tmp_path / "out"), fingerprint(model)
    replace, calls = os.replace, []

    def failing_on_the_weights(source: str, destination: str) -> None:
        calls.append(destination)
        if destination == str(tmp_path / "out" / "model.safetensors"):
            # by now the stale shards and both configs were moved aside, and the new configs moved in
            raise OSError("disk gone")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_on_the_weights)
    with pytest.raises(OSError, match="disk gone"):
        save_pretrained(model, tmp_path / "out")
    monkeypatch.undo()
    assert str(tmp_path / "out" / "config.json") in calls[calls.index(str(tmp_path / "out" / "model.safetensors")) :]
    assert folder_contents(tmp_path / "out") == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert_unchanged(fingerprint_before, model)


def test_a_save_over_an_earlier_one_writes_what_transformers_writes_and_reloads(pruned_llama, tmp_path) -> None:
    model, batch = pruned_llama
    expected = logits(model, batch)
    earlier_save(tmp_path / "ours")
    earlier_save(tmp_path / "plain")
    save_pretrained(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "plain")  # the model is prepared now: what transformers alone writes
    ours = folder_contents(tmp_path / "ours")
    assert ours == folder_contents(tmp_path / "plain")  # stale shards removed, index and notes.txt kept
    assert "model.safetensors" in ours and "notes.txt" in ours and not any("-of-" in name for name in ours)
    assert sorted(os.listdir(tmp_path)) == ["ours", "plain"]
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


def test_a_model_with_neurons_removed_is_refused_before_anything_is_written(tmp_path) -> None:
    """Its keys are those of the config, its shapes are not: the folder would not load (size mismatch)."""
    model = tiny_gpt2().eval()
    batch = token_batch([10, 6])
    ecp_fast.prune(model, [batch], 0.5, "ecp", scope="neuron", sensitivity="local", progress=False)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"argument 'model': parameters have other shapes than its config builds"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_unchanged(before, model)
