"""``ecp-fast export`` (ecp_fast.apps.export_command): the table, the files it writes, one-line user errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

import ecp_fast
from ecp_fast.apps import export_command
from ecp_fast.export import save_compact
from ecp_fast.export.semi_structured import semi_structured_available

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ecp-fast export")
    export_command.add_arguments(parser)
    return export_command.run(parser.parse_args(argv))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A 150-120-10 ReLU MLP pruned to 95%, saved as a state dict with masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(150, 120), nn.ReLU(), nn.Linear(120, 10))
    ecp_fast.prune(model, None, sparsity=0.95, method="magnitude", scope="layer", progress=False)
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    return path


FAST = ["--arch", "mlp:150,120,10", "--batch", "1", "8", "--rounds", "2"]


def test_table_and_files(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exported"
    assert run_command([str(checkpoint), *FAST, "--max-density", "0.2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "batch 1 (us)" in table and "batch 8 (us)" in table and "compact file (save_compact)" in table
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith(("dense ", "csr "))}
    assert "2 csr" in rows["csr"] and "2 dense" in rows["dense"]
    assert {path.name for path in out.iterdir()} == {"dense.pt", "csr.pt", "compact.ecp"}
    model = torch.load(out / "csr.pt", weights_only=False)
    assert model(torch.randn(3, 150)).shape == (3, 10)


def test_measured_choice_and_compact_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_command([str(checkpoint), *FAST, "--measure", "--formats", "csr"]) == 0
    assert "dense " in capsys.readouterr().out  # dense is always timed as the baseline
    template = nn.Sequential(nn.Linear(150, 120), nn.ReLU(), nn.Linear(120, 10))
    ecp_fast.apply_masks_from_state_dict(template, torch.load(checkpoint, weights_only=True))
    template.load_state_dict(torch.load(checkpoint, weights_only=True))
    compact = tmp_path / "model.ecp"
    save_compact(template, compact)
    assert run_command([str(compact), *FAST]) == 0
    assert "compact file" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}", *FAST], "no such file"),
        (["{garbage}", *FAST], "found a file that is not a torch.save file (its first bytes: b'not a ch')"),
        (["{whole}", *FAST], "found a torch.save file that holds a torch.nn.modules.container.Sequential object"),
        (["{listed}", *FAST], "expected a state dict saved with torch.save(model.state_dict()) or a save_compact"),
        (["{listed}", *FAST], "found a list"),
        (["{checkpoint}", *FAST, "--input-shape", "3,3"], "--input-shape 3,3: the model does not run"),
        (["{checkpoint}", *FAST, "--input-shape", "3,3"], "layer '0' (Linear) expects a last size of 150"),
        (["{checkpoint}", "--arch", "mlp:150,99,10"], "does not fit --arch"),
        (["{checkpoint}", "--arch", "mlp:150,x,10"], "mlp sizes must be integers"),
        (["{checkpoint}", "--arch", "mlp:150"], "at least two positive sizes"),
        (["{checkpoint}", "--arch", "mlp:150,120,10:swish"], "activation must be one of"),
        (["{checkpoint}", "--arch", "resnet:18"], "expected mlp:SIZES"),
        (["{checkpoint}", "--arch", "import:no_such_module_xyz:make"], "cannot build the model"),
        (["{checkpoint}", "--arch", "import:collections:OrderedDict", "--input-shape", "4"], "not an nn.Module"),
        (["{checkpoint}", "--arch", "import:torch.nn:Identity"], "--input-shape is needed"),
        (["{checkpoint}", *FAST, "--input-shape", "3,x"], "--input-shape"),
        (["{checkpoint}", *FAST, "--threads", "0"], "at least 1"),
        (["{checkpoint}", *FAST, "--max-density", "2"], "--max-density must be in [0, 1]"),
        (["{checkpoint}", *FAST, "--max-density", "0.1", "--measure"], "exclude each other"),
        (["{checkpoint}", *FAST, "--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save(nn.Sequential(nn.Linear(150, 120), nn.ReLU(), nn.Linear(120, 10)), tmp_path / "whole.pt")
    torch.save([1, 2], tmp_path / "listed.pt")
    paths = {"missing": tmp_path / "missing.pt", "garbage": tmp_path / "garbage.pt", "checkpoint": checkpoint}
    paths |= {"whole": tmp_path / "whole.pt", "listed": tmp_path / "listed.pt"}
    assert_one_line_error(argv, paths, message, capsys)


def assert_one_line_error(
    argv: list[str], paths: dict[str, Path], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ecp-fast export ARGV`` exits 2 with one plain ``error:`` line that holds ``message``."""
    assert run_command([arg.format(**paths) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecp-fast export: error: ") and message in lines[0], captured.err
    assert "\x1b" not in captured.err  # no terminal escape codes copied from torch's messages


def test_unavailable_cuda_names_device(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["{checkpoint}", *FAST, "--device", "cuda"]
    assert_one_line_error(argv, {"checkpoint": checkpoint}, "--device 'cuda': expected an available device", capsys)


def test_failing_model_builder_names_arch(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "user_models_xyz.py").write_text("def boom():\n    raise RuntimeError('no weights for you')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["{checkpoint}", "--arch", "import:user_models_xyz:boom", "--input-shape", "150"]
    message = "--arch 'import:user_models_xyz:boom': cannot build the model: boom() raised RuntimeError: no weights"
    assert_one_line_error(argv, {"checkpoint": checkpoint}, message, capsys)


@pytest.mark.skipif(semi_structured_available(), reason="the CPU error path runs only without a 2:4-capable GPU")
def test_two_four_on_cpu_exits_2(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command([str(checkpoint), *FAST, "--formats", "2:4"]) == 2
    assert "argument 'format': '2:4' needs" in capsys.readouterr().err


def test_argparse_rejects_unknown_format(checkpoint: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        run_command([str(checkpoint), *FAST, "--formats", "coo"])
    assert caught.value.code == 2
