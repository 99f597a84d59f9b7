"""The 1D diffusion-sorption equation of PDEBench, solved by the method of lines with scipy.

::

    u_t = D / R(u) * u_xx,   x in (0, 1),  t in (0, 500]
    R(u) = 1 + (1 - phi) / phi * rho_s * k_f * n_f * (u + 1e-6) ** (n_f - 1)   (Freundlich retardation)
    u(t, 0) = 1 (the solubility),   u(t, 1) = D u_x(t, 1)
    u(0, x) = u0, one random level per sample drawn uniformly from (0, 0.2)

The discretisation follows PDEBench's generator (``pdebench/data_gen/src/sim_diff_sorp.py``): a
cell-centred finite-volume grid of ``cells`` cells of width ``dx = 1 / cells``, the three-point
Laplacian, and ghost values outside both ends: ``1`` on the left and ``D (u[-2] - u[-1]) / dx`` on
the right (a Cauchy condition; with ``D = 5e-4`` the right ghost value is close to 0). The ``1e-6``
shift keeps ``R`` finite at ``u = 0``. PDEBench integrates with explicit RK45 on 1024 cells; here
BDF with the tridiagonal Jacobian pattern is used, which is stable and cheap on any grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionSorption:
    """Physical parameters of PDEBench's 1D diffusion-sorption problem (its ``diff-sorp.yaml``)."""

    diffusion: float = 5e-4  # D
    porosity: float = 0.29  # phi
    rho_s: float = 2880.0  # dry bulk density
    k_f: float = 3.5e-4  # Freundlich parameter
    n_f: float = 0.874  # Freundlich exponent
    solubility: float = 1.0  # the left boundary value
    t_end: float = 500.0

    def retardation(self, u: np.ndarray) -> np.ndarray:
        """The Freundlich retardation factor ``R(u)``."""
        factor = (1.0 - self.porosity) / self.porosity * self.rho_s * self.k_f * self.n_f
        return 1.0 + factor * (u + 1e-6) ** (self.n_f - 1.0)


def cell_centres(cells: int) -> np.ndarray:
    """Centres of ``cells`` equal cells on ``(0, 1)``."""
    dx = 1.0 / cells
    return np.linspace(dx / 2, 1.0 - dx / 2, cells)


def right_ghost(u: np.ndarray, cells: int, problem: DiffusionSorption) -> np.ndarray:
    """The ghost value past ``x = 1`` used by PDEBench: ``D (u[-2] - u[-1]) / dx`` (last axis is space)."""
    return problem.diffusion * (u[..., -2] - u[..., -1]) * cells


def time_derivative(u: np.ndarray, cells: int, problem: DiffusionSorption) -> np.ndarray:
    """``du/dt`` of the semi-discrete system for the cell values ``u`` (length ``cells``)."""
    inv_dx2 = float(cells) ** 2
    padded = np.empty(cells + 2)
    padded[1:-1] = u
    padded[0] = problem.solubility
    padded[-1] = right_ghost(u, cells, problem)
    laplacian = (padded[:-2] - 2.0 * u + padded[2:]) * inv_dx2
    return problem.diffusion / problem.retardation(u) * laplacian


def solve(
    u0: np.ndarray | float,
    times: np.ndarray,
    cells: int,
    problem: DiffusionSorption | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
) -> np.ndarray:
    """Integrate from ``u0`` (a level or ``cells`` values) and return ``u`` at ``times`` as ``(len(times), cells)``.

    BDF with the tridiagonal sparsity pattern of the Jacobian (finite differences on three colours).

    Raises:
        RuntimeError: when the integrator fails.
    """
    problem = problem or DiffusionSorption()
    if cells < 3:
        raise ValueError(f"argument 'cells' must be at least 3, got {cells}")
    start = np.broadcast_to(np.asarray(u0, dtype=np.float64), (cells,)).copy()
    pattern = sparse.diags([np.ones(cells - 1), np.ones(cells), np.ones(cells - 1)], [-1, 0, 1], format="csc")
    result = solve_ivp(
        lambda t, u: time_derivative(u, cells, problem),
        (float(times[0]), float(times[-1])),
        start,
        method="BDF",
        t_eval=times,
        jac_sparsity=pattern,
        rtol=rtol,
        atol=atol,
    )
    if not result.success:
        raise RuntimeError(f"diffusion-sorption solve failed: {result.message}")
    return result.y.T.copy()


def generate(
    samples: int,
    cells: int,
    snapshots: int = 101,
    seed: int = 0,
    problem: DiffusionSorption | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``samples`` trajectories from random constant initial levels in ``(0, 0.2)``.

    Returns ``(u0 levels (samples,), times (snapshots,), u (samples, snapshots, cells))``; float64.
    """
    problem = problem or DiffusionSorption()
    rng = np.random.default_rng(seed)
    levels = rng.uniform(0.0, 0.2, size=samples)
    times = np.linspace(0.0, problem.t_end, snapshots)
    trajectories = np.empty((samples, snapshots, cells))
    for index in tqdm(
        range(samples), desc=f"solve diffusion-sorption ({cells} cells)", disable=not progress, leave=False
    ):
        trajectories[index] = solve(levels[index], times, cells, problem)
    return levels, times, trajectories


def load_or_generate(
    cache_dir: Path,
    samples: int,
    cells: int,
    snapshots: int = 101,
    seed: int = 0,
    problem: DiffusionSorption | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`generate`, cached as ``.npz`` in ``cache_dir`` under a hash of every argument."""
    problem = problem or DiffusionSorption()
    key = json.dumps(
        {
            "samples": samples,
            "cells": cells,
            "snapshots": snapshots,
            "seed": seed,
            "problem": asdict(problem),
            "version": 1,
        },
        sort_keys=True,
    )
    path = Path(cache_dir).expanduser() / f"diffusion_sorption_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            logger.info("loaded the diffusion-sorption data from %s", path)
            return stored["levels"], stored["times"], stored["u"]
    levels, times, trajectories = generate(samples, cells, snapshots, seed, problem, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez_compressed(temporary, levels=levels, times=times, u=trajectories)
    temporary.replace(path)
    logger.info("cached the diffusion-sorption data in %s", path)
    return levels, times, trajectories
