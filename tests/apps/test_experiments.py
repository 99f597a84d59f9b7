"""Tests of the ``mnist`` and ``diffusion-sorption`` experiments and of the diffusion-sorption solver."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from ecp_fast.apps.cli import build_parser, main
from ecp_fast.apps.datasets import DATA_DIR_ENV, MNIST_FILES, write_idx
from ecp_fast.apps.experiments import _common
from ecp_fast.apps.pde import DiffusionSorption, cell_centres, generate, load_or_generate, right_ghost, solve
from ecp_fast.pruning.importance import IMPORTANCES

# The project keeps MNIST beside the repository, in ../shared/data/mnist, unless ECP_DATA_DIR says otherwise.
MNIST_DIR = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist")
HAS_MNIST = all((MNIST_DIR / f"{stem}.gz").is_file() or (MNIST_DIR / stem).is_file() for stem in MNIST_FILES.values())
ONE_SHOT = sorted(set(IMPORTANCES) - {"nonlinear"})
RECONSTRUCTIVE = sorted(_common.RECONSTRUCTIVE_RUNS)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ---- command line ------------------------------------------------------------------------------------


def test_both_experiments_are_registered() -> None:
    parser = build_parser()
    for name in ("mnist", "diffusion-sorption"):
        args = parser.parse_args(["experiment", name, "--quick"])
        assert args.experiment == name and args.quick


def test_parse_ratios_accepts_percent_and_fractions() -> None:
    assert _common.parse_ratios("50,10,95") == (0.1, 0.5, 0.95)
    assert _common.parse_ratios("0.2,0.9") == (0.2, 0.9)
    with pytest.raises(ValueError, match="ratios"):
        _common.parse_ratios("0,50")


# ---- mnist -------------------------------------------------------------------------------------------


def test_mnist_missing_file_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (8, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (4, 28, 28)))
    with pytest.raises(SystemExit, match="t10k-labels-idx1-ubyte"):
        main(["experiment", "mnist", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST IDX files not found in {MNIST_DIR} (set {DATA_DIR_ENV})")
def test_mnist_quick_writes_every_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mnist"
    assert main(["experiment", "mnist", "--quick", "--data-dir", str(MNIST_DIR), "--out", str(out)]) == 0
    for name in (
        "mnist_results.csv",
        "mnist_summary.csv",
        "mnist_tables.md",
        "mnist_loss.png",
        "mnist_accuracy.png",
        "mnist_small_loss.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_rows(out / "mnist_results.csv")
    large = {row["method"] for row in rows if row["network"] == "784-300-100-10"}
    small = {row["method"] for row in rows if row["network"] != "784-300-100-10"}
    assert large == {"dense", "ecp-iterative", *ONE_SHOT, *RECONSTRUCTIVE}
    assert small == {"dense", "ecp-iterative", "nonlinear", *ONE_SHOT}
    assert {row["finetuned"] for row in rows} == {"0", "1"}
    assert all(np.isfinite(float(row["test_loss"])) for row in rows)
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "mnist_tables.md").read_text().strip()
    assert "| ecp |" in printed and "| random |" in printed


# ---- diffusion-sorption solver -------------------------------------------------------------------------


def test_retardation_matches_pdebench_formula() -> None:
    problem = DiffusionSorption()
    u = np.array([0.05, 0.5, 1.0])
    expected = 1 + (1 - 0.29) / 0.29 * 2880 * 3.5e-4 * 0.874 * (u + 1e-6) ** (0.874 - 1)
    np.testing.assert_allclose(problem.retardation(u), expected)
    assert np.all(np.diff(problem.retardation(u)) < 0)  # sorption retards low concentrations more


@pytest.fixture(scope="module")
def solutions() -> dict[int, np.ndarray]:
    times = np.linspace(0.0, 500.0, 101)
    return {cells: solve(0.1, times, cells) for cells in (32, 64, 128)}


def test_solution_stays_in_range_and_fills_from_the_left(solutions: dict[int, np.ndarray]) -> None:
    u = solutions[64]
    assert np.all(np.isfinite(u))
    assert u.min() > -1e-9 and u.max() < 1.0 + 1e-9  # maximum principle: between the data's bounds
    # Dirichlet u = 1 at the left: the first cell rises towards 1; the profile decreases to the right.
    assert u[0, 0] == pytest.approx(0.1) and u[-1, 0] > 0.95
    assert np.all(np.diff(u[-1]) < 0)
    # Inflow from the left dominates: the total amount grows monotonically.
    mass = u.mean(axis=1)
    assert np.all(np.diff(mass) > 0)


def test_right_boundary_is_the_cauchy_condition(solutions: dict[int, np.ndarray]) -> None:
    u = solutions[64]
    problem = DiffusionSorption()
    ghost = right_ghost(u, 64, problem)
    np.testing.assert_allclose(ghost, problem.diffusion * (u[:, -2] - u[:, -1]) * 64)
    # With D = 5e-4 the boundary value is nearly 0, so the last cell drains below its initial level.
    assert np.all(np.abs(ghost) < 1e-3)
    assert u[-1, -1] < 0.1


def test_coarse_and_fine_grids_agree(solutions: dict[int, np.ndarray]) -> None:
    fine_x = cell_centres(128)
    for cells in (32, 64):
        coarse = np.interp(fine_x, cell_centres(cells), solutions[cells][-1])
        assert np.abs(coarse - solutions[128][-1]).max() < 0.1 * 64 / cells
    mass = {cells: solution[-1].mean() for cells, solution in solutions.items()}
    assert abs(mass[64] - mass[128]) < abs(mass[32] - mass[128]) < 0.05  # converging with the grid


def test_dataset_is_cached_and_deterministic(tmp_path: Path) -> None:
    first = load_or_generate(tmp_path, samples=3, cells=16, snapshots=11, seed=1, progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    second = load_or_generate(tmp_path, samples=3, cells=16, snapshots=11, seed=1, progress=False)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    levels, times, u = generate(3, 16, 11, seed=1, progress=False)
    np.testing.assert_array_equal(levels, first[0])
    assert np.all((levels > 0) & (levels < 0.2)) and u.shape == (3, 11, 16) and times[-1] == 500.0


# ---- diffusion-sorption experiment -------------------------------------------------------------------


def test_diffusion_sorption_quick_writes_every_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    argv = ["experiment", "diffusion-sorption", "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(argv) == 0
    for name in (
        "diffusion_sorption_results.csv",
        "diffusion_sorption_summary.csv",
        "diffusion_sorption_tables.md",
        "diffusion_sorption_mse.png",
        "diffusion_sorption_mse_finetuned.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_rows(out / "diffusion_sorption_results.csv")
    assert {row["noise"] for row in rows} == {"0.0", "0.01"}
    for noise in ("0.0", "0.01"):
        methods = {row["method"] for row in rows if row["noise"] == noise}
        assert methods == {"dense", "ecp-iterative", "nonlinear", *ONE_SHOT, *RECONSTRUCTIVE}
    assert all(np.isfinite(float(row["test_mse"])) for row in rows)
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "diffusion_sorption_tables.md").read_text().strip()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
