"""User errors on the command line: one line on stderr, exit status 2, no traceback, before the run starts."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from ecp_fast.apps import cli
from ecp_fast.apps.datasets import DATA_DIR_ENV, MNIST_FILES, DataFileError, check_mnist, load_mnist, write_idx
from ecp_fast.apps.experiments import _common, diffusion_sorption, mnist, regularized

REPO = Path(__file__).resolve().parents[2]
# The project keeps MNIST beside the repository, in ../shared/data/mnist, unless ECP_DATA_DIR says otherwise.
REAL_MNIST = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist")
HAS_MNIST = all((REAL_MNIST / f"{stem}.gz").is_file() for stem in MNIST_FILES.values())
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST, reason=f"MNIST IDX files not found in {REAL_MNIST} (set {DATA_DIR_ENV})"
)


def fake_mnist(directory: Path, compress: bool = True) -> Path:
    """Four tiny valid IDX files with MNIST's names."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28)),
        "train_labels": rng.integers(0, 10, 6),
        "test_images": rng.integers(0, 256, (3, 28, 28)),
        "test_labels": rng.integers(0, 10, 3),
    }
    for key, stem in MNIST_FILES.items():
        write_idx(directory / (stem + (".gz" if compress else "")), arrays[key])
    return directory


def real_mnist_copy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in MNIST_FILES.values():
        shutil.copyfile(REAL_MNIST / f"{stem}.gz", directory / f"{stem}.gz")
    return directory


# ---- the console script, in a subprocess -------------------------------------------------------------


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``python -m ecp_fast ARGUMENTS`` (the console script ``ecp-fast`` runs the same ``main``)."""
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "ecp_fast", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("ecp-fast") and ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


@needs_mnist
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_mnist_is_one_line_and_exit_2(tmp_path: Path, damage: str) -> None:
    data = real_mnist_copy(tmp_path / "mnist")
    target = data / "t10k-images-idx3-ubyte.gz"
    {"missing": Path.unlink, "truncated": _truncate, "corrupt": _corrupt}[damage](target)
    out = tmp_path / "out"
    result = run_cli("experiment", "mnist", "--quick", "--data-dir", str(data), "--out", str(out))
    assert_one_line_error(result, "t10k-images-idx3-ubyte")
    assert not out.exists()  # refused before the run (which would have created it)


def test_out_that_is_a_file_or_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "results.csv"
    blocker.write_text("not a folder")
    assert_one_line_error(run_cli("demo", "--quick", "--out", str(blocker)), "--out", "is a file")
    result = run_cli("experiment", "regularized", "--quick", "--dataset", "digits", "--out", str(blocker / "sub"))
    assert_one_line_error(result, "--out", "cannot be created")


def test_malformed_ratios_under_quick(tmp_path: Path) -> None:
    result = run_cli("experiment", "diffusion-sorption", "--quick", "--ratios", "10,,abc", "--out", str(tmp_path))
    assert_one_line_error(result, "--ratios", "'10,,abc'")


# ---- in process: every check happens before the run ----------------------------------------------------


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every experiment's run (and the demo's) fail the test if the checks let it start."""

    def started(args: Any) -> int:
        raise AssertionError("the run started although the arguments were invalid")

    for module in (mnist, diffusion_sorption, regularized):
        monkeypatch.setattr(module, "run", started)
    from ecp_fast.apps import demo

    monkeypatch.setattr(demo, "run", started)


def main_error(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    """The one stderr line of ``ecp-fast ARGUMENTS``, after checking exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(arguments))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(info.value) == lines[0]
    return lines[0]


@pytest.mark.usefixtures("no_run")
@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["experiment", "mnist", "--quick", "--finetune-ratios", "0"], "--finetune-ratios"),
        (["experiment", "mnist", "--quick", "--iterative-ratios", "nan"], "--iterative-ratios"),
        (["experiment", "mnist", "--quick", "--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
        (["experiment", "mnist", "--quick", "--calibration-samples", "-5"], "--calibration-samples"),
        (["experiment", "diffusion-sorption", "--quick", "--noise", "0,abc"], "--noise"),
        (["experiment", "diffusion-sorption", "--quick", "--noise", ""], "--noise needs at least one level"),
        (["experiment", "diffusion-sorption", "--quick", "--hidden", "32,0"], "--hidden"),
        (["experiment", "diffusion-sorption", "--quick", "--lr", "inf"], "--lr must be a finite number"),
        (["experiment", "diffusion-sorption", "--quick", "--cache-dir", "{blocker}"], "--cache-dir"),
        (["experiment", "regularized", "--quick", "--dataset", "digits", "--backoff", "1.5"], "--backoff"),
        (["experiment", "regularized", "--quick", "--dataset", "digits", "--max-sparsity", "0"], "--max-sparsity"),
        (["experiment", "regularized", "--quick", "--dataset", "digits", "--bound", "nan"], "--bound"),
        (
            ["experiment", "regularized", "--quick", "--dataset", "digits", "--lenet5-prune-fraction", "1"],
            "--lenet5-prune-fraction",
        ),
        (["experiment", "regularized", "--quick", "--dataset", "digits", "--alpha", "0"], "--alpha"),
        (["experiment", "regularized", "--quick", "--data-dir", "{missing}"], "does not exist"),
        (
            ["experiment", "regularized", "--quick", "--data-dir", "{partial}"],
            "'t10k-labels-idx1-ubyte[.gz]' not found",
        ),
        (["demo", "--quick", "--out", "{blocker}/deeper/still"], "cannot be created"),
        (["demo", "--quick", "--seeds", "many"], "invalid int value: 'many'"),
        (["demo", "--seeds", "0"], "ecp-fast demo: error: --seeds must be an integer >= 1, got 0"),
        (["demo", "--hidden", "0"], "--hidden must be an integer >= 1, got 0"),
        (["experiment", "mnist", "--quick", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ],
)
def test_every_option_is_checked_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], fragment: str
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    partial = fake_mnist(tmp_path / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    values = {"blocker": str(blocker), "missing": str(tmp_path / "missing"), "partial": str(partial)}
    arguments = [argument.format(**values) for argument in arguments]
    if arguments[:2] == ["experiment", "mnist"]:
        arguments += ["--data-dir", str(fake_mnist(tmp_path / "mnist"))]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "out")]
    line = main_error(capsys, *arguments)
    assert fragment in line, line
    assert not (tmp_path / "out").exists()


def test_demo_run_checks_its_counts_without_the_command_line(tmp_path: Path) -> None:
    from ecp_fast.apps import demo

    args = cli.build_parser().parse_args(["demo", "--seeds", "0", "--out", str(tmp_path / "out")])
    with pytest.raises(cli.UsageError, match="--seeds must be an integer >= 1, got 0"):
        demo.run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_run")
def test_checks_pass_then_the_folders_are_created_and_the_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(mnist, "run", lambda args: calls.append("run") or 0)
    out = tmp_path / "new" / "out"
    data = fake_mnist(tmp_path / "d")
    assert cli.main(["experiment", "mnist", "--quick", "--data-dir", str(data), "--out", str(out)]) == 0
    assert calls == ["run"] and out.is_dir()


def test_data_errors_during_the_run_are_one_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(mnist, "validate", lambda args: None)

    def run(args: Any) -> int:
        raise DataFileError("read_idx: somewhere.gz is truncated or corrupt (boom)")

    monkeypatch.setattr(mnist, "run", run)
    line = main_error(capsys, "experiment", "mnist", "--quick", "--out", str(tmp_path / "o"))
    assert line == "ecp-fast experiment mnist: error: read_idx: somewhere.gz is truncated or corrupt (boom)"


def test_interrupt_is_one_line_and_status_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(regularized, "run", run)
    assert cli.main(["experiment", "regularized", "--dataset", "digits", "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "ecp-fast experiment regularized: interrupted\n"


# ---- properties: ratios and damaged files --------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789.,-+eEnaifx %", max_size=14))
def test_ratios_parse_or_raise_a_usage_error(text: str) -> None:
    try:
        fractions = _common.parse_ratios(text, option="--ratios")
    except cli.UsageError as error:
        assert str(error).startswith("--ratios: ") and repr(text) in str(error)
        return
    assert fractions and list(fractions) == sorted(fractions) and all(0.0 < f < 1.0 for f in fractions)


@pytest.fixture(scope="module")
def fake_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fake_mnist")
    return {"gz": fake_mnist(root / "gz"), "raw": fake_mnist(root / "raw", compress=False)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stem=st.sampled_from(sorted(MNIST_FILES.values())),
    compress=st.booleans(),
    damage=st.sampled_from(["truncate", "flip", "append"]),
    where=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_damaged_files_are_refused_or_read_unchanged(
    tmp_path_factory: pytest.TempPathFactory,
    fake_files: dict[str, Path],
    stem: str,
    compress: bool,
    damage: str,
    where: float,
    data: st.DataObject,
) -> None:
    """check_mnist either names the damaged file or the file still holds exactly the original data.

    A gzip stream carries a CRC, so any damage to the data is found; a raw file carries none, so
    only its header is damaged here (its data bytes are pixels: every value is valid).
    """
    source = fake_files["gz" if compress else "raw"]
    directory = tmp_path_factory.mktemp("damaged")
    for name in os.listdir(source):
        shutil.copyfile(source / name, directory / name)
    path = directory / (stem + (".gz" if compress else ""))
    original = path.read_bytes()
    position = min(int(where * len(original)), len(original) - 1)
    if damage == "truncate":
        damaged = original[:position]
    elif damage == "flip":
        if not compress:  # raw IDX data has no checksum: any byte is a valid pixel, so flip the header
            position = data.draw(st.integers(0, 4 + 4 * original[3] - 1))
        bit = data.draw(st.integers(0, 7))
        damaged = original[:position] + bytes([original[position] ^ (1 << bit)]) + original[position + 1 :]
    else:
        damaged = original + data.draw(st.binary(min_size=1, max_size=8))
    path.write_bytes(damaged)
    try:
        check_mnist(directory)
    except (DataFileError, FileNotFoundError) as error:
        assert str(path) in str(error) or str(directory) in str(error)
        return
    opener = gzip.open if compress else open
    with opener(source / path.name, "rb") as before, opener(path, "rb") as after:
        assert before.read() == after.read()
    load_mnist(directory)  # what the check accepts, the loader reads


@needs_mnist
def test_checks_real_mnist_quickly() -> None:
    assert check_mnist(REAL_MNIST) == REAL_MNIST
