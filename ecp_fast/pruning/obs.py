"""Optimal Brain Surgeon pruning and exact least-squares refitting of one linear layer.

Conventions
-----------
A layer has weight ``W`` (out, in) and bias ``b`` (out,), zeros when the layer has none. Inputs
are augmented with a constant 1 in the LAST position, ``x~ = [a; 1]``, so the layer's quadratic is
the weighted Gram matrix ``H = sum_s w_s x~_s x~_s^T`` of shape (in+1, in+1), whose last row and
column belong to the bias, and the augmented weight is ``W~ = [W | b]`` of shape (out, in+1).
Changing row ``i`` from ``w~_old`` to ``w~_new`` costs ``(w~_new - w~_old)^T H (w~_new - w~_old)``
of summed squared output error. The bias column is never pruned.

* :func:`obs_sweep` prunes column by column with Optimal Brain Surgeon updates in the blocked,
  Cholesky-based form: the mask is chosen on the fly ("unstructured", "row" or N:M) or given.
  Each pruned column's error is pushed only onto the columns to its RIGHT; kept columns already
  swept are frozen. With a fixed mask the result is therefore the exact constrained minimiser of
  the (dampened) quadratic only when, in every row, all pruned columns precede all kept ones; in
  general it is the column-sequential solution, and :func:`refit` gives the global optimum.
* :func:`refit` solves, for a fixed mask, the ridge-regularised least-squares problem per row,
  optionally fitting the DENSE network's output from the PRUNED network's inputs.
"""

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Union

import torch

from ecp_fast.pruning.selection import target_count

logger = logging.getLogger(__name__)

Pattern = Union[str, tuple[int, int]]  # noqa: UP007 - a runtime alias, valid on Python 3.9

# Padded per-row systems in refit are built in chunks of at most this many matrix entries
# (32 MiB in float64), so low-sparsity layers with all-different supports stay within memory.
_MAX_BATCH_ENTRIES = 1 << 22
# On the CPU the padded systems of a chunk are solved in pieces of about this many entries (2 MiB in
# float64): small pieces reuse the same memory instead of touching fresh pages for every chunk.
_MAX_PIECE_ENTRIES = 1 << 18
# Up to this many distinct row supports, one factorisation per support with many right-hand
# sides is cheaper than padding every row to its own system.
_MAX_GROUPED_SUPPORTS = 16


@dataclass
class ObsResult:
    """Outcome of :func:`obs_sweep`.

    Attributes:
        weight: (out, in) new weights, exactly zero where pruned, in the input weight's dtype.
        bias: (out,) new bias (updated, never pruned).
        mask: (out, in) bool, True = kept.
        error: sum over rows of ``(w~_new - w~_old)^T H (w~_new - w~_old)`` with the UNdampened H.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor
    error: float


@dataclass(frozen=True)
class InverseFactor:
    """What an OBS sweep needs of a Gram matrix, made once by :func:`inverse_factor` for all its sweeps.

    Attributes:
        upper: (in+1, in+1) upper Cholesky factor ``U`` of the dampened inverse (``H^-1 = U^T U``).
        dead: (in+1,) bool, the inputs whose diagonal in ``H`` is 0 (never the bias).
        damp: the dampening it was made with.
    """

    upper: torch.Tensor
    dead: torch.Tensor
    damp: float


# --------------------------------------------------------------------------- argument checks


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def _check_layer(weight: object, bias: object, wname: str = "weight", bname: str = "bias") -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"argument '{wname}' must be a floating-point tensor, got {_describe(weight)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(
            f"argument '{wname}' must have shape (out, in) with out, in >= 1, got shape {tuple(weight.shape)}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"argument '{wname}' must be finite, got NaN or infinite entries")
    out = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"argument '{bname}' must be None or a floating-point tensor, got {_describe(bias)}")
        if tuple(bias.shape) != (out,):
            raise ValueError(
                f"argument '{bname}' must have shape ({out},) to match '{wname}' of shape "
                f"{tuple(weight.shape)}, got shape {tuple(bias.shape)}"
            )
        if not torch.isfinite(bias).all():
            raise ValueError(f"argument '{bname}' must be finite, got NaN or infinite entries")
    return out, weight.shape[1]


def _check_square(matrix: object, name: str, n_in: int | None = None) -> None:
    if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point():
        raise TypeError(f"argument '{name}' must be a floating-point tensor, got {_describe(matrix)}")
    size = matrix.shape[0] if matrix.dim() == 2 else -1
    expected = (size, size) if n_in is None else (n_in + 1, n_in + 1)
    if tuple(matrix.shape) != expected or size < 1:
        wanted = f"shape {expected} (in+1 for the bias, in={n_in})"
        if n_in is None:
            wanted = "a non-empty square matrix"
        raise ValueError(f"argument '{name}' must have {wanted}, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"argument '{name}' must be finite, got NaN or infinite entries")


def _check_real(value: object, name: str, low: float, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    number = float(value) if ok else 0.0  # type: ignore[arg-type]  # checked just above
    ok = ok and low <= number and (number < high if high_open else number <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"argument '{name}' must be a real number in [{low:g}, {high:g}{bracket}, got {value!r}")


def _check_mask(mask: object, out: int, n_in: int, name: str = "mask") -> None:
    meaning = "True = keep" if name == "mask" else "True = removed"
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"argument '{name}' must be a bool tensor ({meaning}), got {_describe(mask)}")
    if tuple(mask.shape) != (out, n_in):
        raise ValueError(
            f"argument '{name}' must have shape {(out, n_in)} to match the weight, got shape {tuple(mask.shape)}"
        )


def _check_dtype(dtype: object) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"argument 'dtype' must be torch.float32 or torch.float64, got {dtype!r}")


def _check_selection(
    sparsity: object, pattern: object, mask: object, out: int, n_in: int, block_size: object
) -> Pattern:
    """Validate how columns are chosen; return "fixed", "unstructured", "row" or (n, m)."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"argument 'block_size' must be an int >= 1, got {block_size!r}")
    _check_real(sparsity, "sparsity", 0.0, 1.0, high_open=True)
    if mask is not None:
        _check_mask(mask, out, n_in)
        if sparsity != 0:
            raise ValueError(
                f"argument 'sparsity' must be 0 when an explicit 'mask' is given (the mask fixes it), got {sparsity!r}"
            )
        return "fixed"
    if isinstance(pattern, str) and pattern in ("unstructured", "row"):
        return pattern
    if not (
        isinstance(pattern, (tuple, list))
        and len(pattern) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
    ):
        raise ValueError(f"argument 'pattern' must be 'unstructured', 'row' or a tuple (n, m) of ints, got {pattern!r}")
    n, m = int(pattern[0]), int(pattern[1])
    if not 0 < n <= m:
        raise ValueError(f"argument 'pattern' (n, m) must satisfy 0 < n <= m (keep n of every m), got {(n, m)}")
    if n_in % m:
        raise ValueError(
            f"argument 'pattern' {(n, m)} needs m to divide the number of inputs: m={m} does not divide in={n_in}"
        )
    if block_size % m:
        raise ValueError(
            f"argument 'block_size' must be a multiple of m={m} for the pattern {(n, m)}, got {block_size}"
        )
    return (n, m)


# --------------------------------------------------------------------------- linear algebra


def _augment(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is None:
        column = torch.zeros(weight.shape[0], 1, dtype=dtype, device=weight.device)
    else:
        column = bias.to(dtype)[:, None]
    return torch.cat([weight.to(dtype), column], dim=1)


def _quadratic(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Sum over rows of delta_i^T H delta_i, always accumulated in float64."""
    delta, gram = delta.to(torch.float64), gram.to(torch.float64)
    return float(((delta @ gram) * delta).sum())


class SingularError(ValueError):
    """A Gram matrix (or a row's part of it) is singular after dampening (or with the ridge)."""


def _finite_factor(factor: torch.Tensor) -> bool:
    """Whether a Cholesky factor the factorisation accepted (info 0) is finite, from its diagonal alone.

    Every off-diagonal entry of row j of L enters pivot j (``L_jj^2 = A_jj - sum_k L_jk^2``; likewise
    column j of an upper factor), so an infinite or NaN entry makes that pivot NaN or not positive
    (reported through info, or NaN on the diagonal), and an infinite pivot is on the diagonal. The
    diagonal is a small read next to the whole batch of factors.
    """
    return bool(torch.isfinite(factor.diagonal(dim1=-2, dim2=-1)).all())


def _cholesky_in_place(matrix: torch.Tensor, upper: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex`` of a matrix (or batch) written over the matrix where its memory
    allows, so no second matrix of its size is held: LAPACK factors column-major matrices, and torch
    copies any other into a fresh one first.

    A column-major matrix is factored where it lies. A row-major one is, when it is exactly symmetric:
    its transpose is then the same matrix, column-major. Either way the logical matrix LAPACK reads is
    the one a copy would hold, so the factor is the same, bit for bit (and column-major, as a copy's
    is). Any other matrix is factored from a copy and left as it was.
    """
    if matrix.mT.is_contiguous():
        column_major = matrix
    elif matrix.is_contiguous() and torch.equal(matrix, matrix.mT):
        column_major = matrix.mT
    else:
        return torch.linalg.cholesky_ex(matrix, upper=upper)
    info = torch.empty(matrix.shape[:-2], dtype=torch.int32, device=matrix.device)
    return torch.linalg.cholesky_ex(column_major, upper=upper, out=(column_major, info))


def _inverse_upper_cholesky(damped: list[torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i of U, scaled, is the OBS update
    direction for column i in the problem restricted to columns i, i+1, ...

    ``damped`` holds the dampened matrix and is emptied: each step writes over the matrix before it
    (:func:`_cholesky_in_place`; the inverse is made in place of the factor), so the dampened matrix
    becomes U without a second (in + 1)^2 matrix (two where it is not exactly symmetric)."""
    factor, info = _cholesky_in_place(damped.pop())
    if int(info) == 0:
        factor = torch.cholesky_inverse(factor, out=factor)  # column-major: LAPACK inverts it where it lies
        factor, info = _cholesky_in_place(factor, upper=True)
    if int(info) != 0 or not _finite_factor(factor):
        raise SingularError(
            f"the Gram matrix is singular after dampening with damp={damp} (Cholesky factorisation "
            f"failed at order {int(info)}) in {factor.dtype}; use a larger damp, e.g. damp={max(10 * damp, 0.01):g}"
            + ("" if factor.dtype == torch.float64 else ", or compute in float64 (dtype=torch.float64)")
        )
    return factor


def _cholesky_or_raise(systems: torch.Tensor, ridge: float) -> torch.Tensor:
    """The lower Cholesky factors of a batch of systems, written over ``systems`` where their memory
    allows (:func:`_cholesky_in_place`)."""
    factor, info = _cholesky_in_place(systems)
    if bool((info != 0).any()) or not _finite_factor(factor):
        raise SingularError(
            f"the Gram matrix restricted to a row's kept inputs is singular with ridge={ridge}; "
            f"use a larger ridge, e.g. ridge={max(10 * ridge, 0.01):g}"
        )
    return factor


def dampen(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Return a dampened copy of an augmented Gram matrix (bias last).

    Dead inputs (zero diagonal, non-bias) are decoupled and given diagonal 1, since their weights
    multiply an input that is always 0 and can be pruned for free. Then ``damp *``
    :func:`damping_scale` (the mean diagonal about the inputs' means, taken after the dead fix) is
    added to the whole diagonal.
    """
    _check_square(gram, "gram")
    _check_real(damp, "damp", 0.0)
    return _dampen_in_place(gram.clone(), damp)


def _dead_inputs(gram: torch.Tensor) -> torch.Tensor:
    """(in+1,) bool: the inputs whose diagonal is 0 (the bias, last, never counts as dead)."""
    dead = gram.diagonal() == 0
    dead[-1] = False
    return dead


def _dampen_in_place(damped: torch.Tensor, damp: float) -> torch.Tensor:
    """:func:`dampen` without the copy: ``damped`` is changed and returned."""
    dead = torch.nonzero(damped.diagonal()[:-1] == 0).flatten()
    damped[dead, :] = 0  # a true Gram matrix already has zeros here; this keeps it so for any input
    damped[:, dead] = 0
    damped[dead, dead] = 1
    damped.diagonal().add_(damping_diagonal(damped, damp))
    return damped


def _centred(gram: torch.Tensor) -> bool:
    """Whether dampening is taken about the inputs' means: ``gram`` has a bias column (``H_bb``, last,
    the summed sample weights, above 0); a bias-free layer (bias row and column zeroed) has no mean to
    take."""
    return bool(gram[-1, -1] > 0)


def damping_scale(gram: torch.Tensor) -> torch.Tensor:
    """The mean diagonal that dampening and the refit's ridge are a fraction of, taken about the inputs'
    (weighted) means: ``H_jj - H_jb^2 / H_bb`` for every input ``j``, with ``H_bb`` (the bias column,
    last, the summed sample weights) itself. A constant shift of the inputs, which the bias absorbs
    exactly, then leaves the scale as it is; the raw mean diagonal would grow with the shift squared and
    dampen the directions that matter, their spread, out of the solve. Without a bias column it is the
    raw mean diagonal. Computed in float64 whatever ``gram``'s dtype, in ``gram``'s dtype."""
    diagonal = gram.diagonal().double()
    if not _centred(gram):
        return diagonal.mean().to(gram.dtype)
    count = diagonal[-1]
    spread = (diagonal[:-1] - gram[:-1, -1].double() ** 2 / count).clamp_(min=0)  # >= 0 but for rounding
    return ((spread.sum() + count) / diagonal.numel()).to(gram.dtype)


def damping_diagonal(gram: torch.Tensor, fraction: float) -> torch.Tensor:
    """What dampening (or the refit's ridge) adds to each diagonal entry of ``gram``: ``fraction *``
    :func:`damping_scale` on every input and, where it is not :func:`_centred`, on the bias too. A
    centred one leaves the bias undampened: its change after a shift ``o`` is ``db - dw . o``, so
    dampening it would bring the shift back (``H_bb > 0`` keeps the matrix definite without it)."""
    added = (fraction * damping_scale(gram)).expand(gram.shape[0]).clone()
    if _centred(gram):
        added[-1] = 0
    return added


@torch.no_grad()  # every solver entry point: not differentiable; grad-tracking inputs are read as values
def inverse_factor(
    gram: torch.Tensor | list[torch.Tensor],
    damp: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> InverseFactor:
    """What :func:`obs_sweep` works from in place of ``gram``: computed once, it serves every sweep of
    that Gram matrix, and the matrix itself need not be kept.

    ``gram`` given as a one-element list is taken over: the list is emptied and the matrix (when it
    has ``dtype`` already) is dampened in place and becomes the factor (in its own memory where it
    is exactly symmetric), so no copy of it is ever held beside it. Raises SingularError (a
    ValueError) if H is singular after dampening.
    """
    owned = isinstance(gram, list)
    if owned and len(gram) != 1:
        raise ValueError(f"argument 'gram' given as a list must hold exactly one matrix, got {len(gram)} items")
    _check_square(gram[0] if isinstance(gram, list) else gram, "gram")
    _check_real(damp, "damp", 0.0)
    _check_dtype(dtype)
    matrix = gram.pop() if isinstance(gram, list) else gram  # checked first: a refused matrix stays the caller's
    converted = matrix.to(dtype)
    dead = _dead_inputs(converted)  # as the sweep sees them: in the dtype it computes in
    ours = owned or converted is not matrix  # a matrix no one else sees may be dampened in place
    del matrix
    damped = [_dampen_in_place(converted, damp) if ours else dampen(converted, damp)]
    del converted
    return InverseFactor(_inverse_upper_cholesky(damped, damp), dead, float(damp))


# --------------------------------------------------------------------------- the sweep


def _scores(
    block: torch.Tensor, hinv_diag: torch.Tensor, dead: torch.Tensor, removed: torch.Tensor | None = None
) -> torch.Tensor:
    """OBS saliency w^2 / [U]_ii^2; dead inputs score -inf so they are always pruned first.

    ``dead`` marks columns ``(width,)``, or entries ``(out, width)`` where weights removed before
    the sweep are marked too (they then take their share of the removals first). With ``removed``
    (those entries) they come before the dead inputs: they are gone already, so the removals they
    count for are not spent on dead inputs while they stay unchosen (and then removed anyway)."""
    scores = block**2 / hinv_diag**2
    if removed is None:
        return scores.masked_fill(dead, -math.inf)
    return scores.masked_fill(dead, -torch.finfo(scores.dtype).max).masked_fill(removed, -math.inf)


def _smallest(scores: torch.Tensor, count: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``count`` smallest scores along ``dim``, in no particular order.

    ``sorted=False`` only skips ordering the selection: which entries are selected (ties included)
    is the same as with ``sorted=True``, and every caller uses the indices as a set.
    """
    return torch.topk(scores, count, dim=dim, largest=False, sorted=False).indices


def _smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the ``count`` smallest of all ``scores``: the entries :func:`_smallest` selects.

    Where most entries go, the few that stay are asked for instead (a selection of a tenth the size
    at 90%), whenever that decides the same set: no score outside them equals the smallest of them.
    Otherwise (a tie across the boundary, which ``topk`` breaks its own way) it is ``_smallest``'s.
    """
    flat = scores.flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    stay = flat.numel() - count
    if 0 < stay < count:
        largest = torch.topk(flat, stay, largest=True, sorted=False)
        boundary = largest.values.min()
        if int((flat == boundary).sum()) == int((largest.values == boundary).sum()):
            chosen.fill_(True)
            chosen[largest.indices] = False
            return chosen.view_as(scores)
    if count:
        chosen[_smallest(flat, count)] = True
    return chosen.view_as(scores)


def _block_keep(scores: torch.Tensor, mode: str, sparsity: float, count: int | None = None) -> torch.Tensor:
    """Keep-mask of one block's prunable columns for the 'unstructured' or 'row' pattern.

    ``count`` overrides the number of entries an unstructured block removes (a layer-wide budget), or
    each row of a 'row' block (its share of the row's count, see :func:`_row_counts`).
    """
    out, width = scores.shape
    keep = torch.ones(out, width, dtype=torch.bool, device=scores.device)
    if mode == "unstructured":
        count = target_count(out * width, sparsity) if count is None else count
        if count:
            keep.view(-1)[_smallest(scores.flatten(), count)] = False
    else:
        count = target_count(width, sparsity) if count is None else count
        if count:
            keep.scatter_(1, _smallest(scores, count, dim=1), False)
    return keep


def _row_counts(n_in: int, sparsity: float, block_size: int) -> list[int]:
    """Removals per row in each block of the 'row' pattern: the row's count (:func:`target_count` of the
    whole row, as the mask methods' row scope) split by rounding the running total at each block's end,
    so the blocks add up to it exactly (rounding each block on its own lost up to a weight per block)."""
    total = target_count(n_in, sparsity)
    ends = [min(start + block_size, n_in) for start in range(0, n_in, block_size)]
    running = [0] + [math.floor(sparsity * end + 0.5) for end in ends[:-1]] + [total]
    return [max(0, after - before) for before, after in itertools.pairwise(running)]


def _layer_budgets(
    w: torch.Tensor,
    u: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    block_size: int,
    n_in: int,
    removed: torch.Tensor | None = None,
) -> list[int]:
    """Removals per block from one ranking of the whole layer's saliencies before the sweep."""
    scores = _scores(w[:, :n_in], u.diagonal()[:n_in], dead[..., :n_in], None if removed is None else removed[:, :n_in])
    removed = _smallest_mask(scores, target_count(scores.numel(), sparsity))
    per_column = removed.sum(0)
    return [int(per_column[i1 : i1 + block_size].sum()) for i1 in range(0, n_in, block_size)]


def _choose_group(
    rows: torch.Tensor,
    keep1: torch.Tensor,
    keep_rows: torch.Tensor,
    d: torch.Tensor,
    dead1: torch.Tensor,
    i: int,
    mode: tuple[int, int],
    removed1: torch.Tensor | None,
) -> None:
    """N:M: keep the n best of the group of m columns starting at ``i``, from their current weights;
    weights ``removed1`` before the sweep stay removed (and count among the group's m - n first)."""
    n, m = mode
    scores = _scores(
        rows[i : i + m].T, d[i : i + m], dead1[..., i : i + m], None if removed1 is None else removed1[:, i : i + m]
    )
    keep1[:, i : i + m] = True
    keep1[:, i : i + m].scatter_(1, _smallest(scores, m - n, dim=1), False)
    if removed1 is not None:
        keep1[:, i : i + m] &= ~removed1[:, i : i + m]
    keep_rows[i : i + m] = keep1[:, i : i + m].T


def _sweep_block(
    w: torch.Tensor,
    u1: torch.Tensor,
    keep1: torch.Tensor,
    mode: Pattern,
    dead1: torch.Tensor,
    i1: int,
    width: int,
    removed1: torch.Tensor | None = None,
) -> torch.Tensor:
    """OBS over the columns ``i1 .. i1 + len(u1)`` of ``w`` (in place); returns the block's errors ``(out, B)``.

    Column ``i`` is pruned where ``keep1`` says so and its error ``(w_i - kept_i) / U_ii`` is pushed
    onto the block's columns to its right through row ``i`` of ``U``. The block is worked on
    transposed (one contiguous row per column), with the same arithmetic, entry by entry.
    """
    size = u1.shape[0]
    rows = w[:, i1 : i1 + size].T.contiguous()
    keep_rows = keep1.T.contiguous()
    errors = torch.empty_like(rows)
    d = u1.diagonal()
    pivots = d.tolist()
    columns, kept_columns, error_columns = rows.unbind(0), keep_rows.unbind(0), errors.unbind(0)
    for i in range(size):
        if isinstance(mode, tuple) and i < width and i % mode[1] == 0:
            _choose_group(rows, keep1, keep_rows, d, dead1, i, mode, removed1)
        column, error = columns[i], error_columns[i]
        kept = column * kept_columns[i]
        torch.sub(column, kept, out=error).div_(pivots[i])
        column.copy_(kept)  # exact zeros rather than rounding residue
        if i + 1 < size:
            rows[i + 1 :].sub_(u1[i, i + 1 :, None] * error)
    w[:, i1 : i1 + size] = rows.T
    return errors.T.contiguous()


def _sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    keep: torch.Tensor,
    mode: Pattern,
    sparsity: float,
    block_size: int,
    dead: torch.Tensor,
    *,
    budget: str = "block",
    removed: torch.Tensor | None = None,
) -> None:
    """Column-sequential OBS over the augmented weight ``w`` (in place); fills ``keep`` unless fixed.

    ``removed`` ``(out, in + 1)``: weights removed before the sweep, pruned first and never kept."""
    n_in = keep.shape[1] - 1
    if removed is not None:  # entry by entry: they score -inf as dead inputs do
        dead = dead[None, :] | removed
    budgets = (
        _layer_budgets(w, u, dead, sparsity, block_size, n_in, removed)
        if mode == "unstructured" and budget == "layer"
        else _row_counts(n_in, sparsity, block_size)
        if mode == "row"
        else None
    )
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        u1, keep1 = u[i1:i2, i1:i2], keep[:, i1:i2]
        removed1 = None if removed is None else removed[:, i1:i2]
        width = max(0, min(i2, n_in) - i1)  # prunable columns in this block (the bias is not)
        if mode in ("unstructured", "row") and width:
            block_removed = None if removed1 is None else removed1[:, :width]
            scores = _scores(w[:, i1 : i1 + width], u1.diagonal()[:width], dead[..., i1 : i1 + width], block_removed)
            count = None if budgets is None else budgets[i1 // block_size]
            keep1[:, :width] = _block_keep(scores, mode, sparsity, count)
        if removed1 is not None:
            keep1 &= ~removed1
        errors = _sweep_block(w, u1, keep1, mode, dead[..., i1:i2], i1, width, removed1)
        w[:, i2:] -= errors @ u[i1:i2, i2:]


def _check_sweep_extras(
    gram: object, budget: object, factor: object, damp: float, shape: tuple[int, int], removed: object
) -> None:
    out, n_in = shape
    if removed is not None:
        _check_mask(removed, out, n_in, "removed")
    if budget not in ("block", "layer"):
        raise ValueError(f"argument 'budget' must be 'block' or 'layer', got {budget!r}")
    if gram is not None:
        _check_square(gram, "gram", n_in)
    if factor is None:
        if gram is None:
            raise ValueError("argument 'gram' must be a Gram matrix when no 'factor' is given, got None")
        return
    if not isinstance(factor, InverseFactor):
        raise TypeError(f"argument 'factor' must be an InverseFactor (see inverse_factor), got {_describe(factor)}")
    _check_square(factor.upper, "factor", n_in)
    if factor.damp != damp:
        raise ValueError(f"argument 'factor' was made with damp={factor.damp:g}, but the sweep asks for damp={damp:g}")


def _starting_masks(
    mask: torch.Tensor | None, removed: torch.Tensor | None, out: int, n_in: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The augmented keep mask a sweep starts from (``mask``, or all kept) and ``removed`` augmented
    with the bias column (never removed), or None."""
    keep = torch.ones(out, n_in + 1, dtype=torch.bool, device=device)
    if mask is not None:
        keep[:, :n_in] = mask.to(device)
    return keep, None if removed is None else torch.cat([removed.to(device), keep.new_zeros(out, 1)], dim=1)


def _factor_in(
    gram: torch.Tensor | None, factor: InverseFactor | None, damp: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` and the dead inputs, from ``factor`` or made from ``gram`` (already on ``like``'s device
    and in its dtype), as ``like``'s device and dtype."""
    if factor is None:
        assert gram is not None  # checked by the caller
        return _inverse_upper_cholesky([dampen(gram, damp)], damp), _dead_inputs(gram)
    return factor.upper.to(like), factor.dead.to(like.device)


@torch.no_grad()
def obs_sweep(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor | None,
    sparsity: float = 0.0,
    *,
    pattern: Pattern = "unstructured",
    mask: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float64,
    budget: str = "block",
    factor: InverseFactor | None = None,
    measure_error: bool = True,
    removed: torch.Tensor | None = None,
) -> ObsResult:
    """Prune a layer by a blocked column-sequential Optimal Brain Surgeon sweep.

    Args:
        weight: (out, in) weights. bias: (out,) or None (treated as zeros).
        gram: (in+1, in+1) augmented Gram matrix, bias last; None when ``factor`` is given.
        sparsity: fraction in [0, 1) removed; ignored for N:M patterns; must be 0 with ``mask``.
        pattern: "unstructured" (fraction of each block's out x width entries, count by round(),
            at least one kept), "row" (per row within each block, likewise) or (n, m): keep n of every
            m aligned inputs, chosen when the sweep reaches the group; m must divide in and block_size.
        mask: (out, in) bool, True = keep; if given, only the OBS error propagation runs.
        block_size: columns per block; damp: fraction of :func:`damping_scale` added to the diagonal.
        dtype: computation dtype; results come back in the weight's (and bias's) dtype.
        budget: for "unstructured", each block removes the same fraction ("block", as SparseGPT
            does) or its share of one ranking of the whole layer before the sweep ("layer": blocks
            of inputs that matter little give up more; entries are still chosen from the updated weights).
        factor: :func:`inverse_factor` of the Gram matrix (made with this ``damp``), when several
            sweeps share one (computed here otherwise); ``gram`` may then be None.
        measure_error: compute ``error`` (a product with H); False, or no ``gram``, leaves it NaN.
        removed: (out, in) bool, True where a weight was removed before this sweep: it is pruned
            first (counting toward the sparsity of its block, row or group) and is never kept.

    Dead inputs (zero diagonal: 0 on every calibration sample) are pruned before anything else (free:
    they never affect the output there); those the sparsity leaves kept keep their weights, which the
    data says nothing against. Raises :class:`SingularError` (a ValueError) if H is singular after damping.
    """
    out, n_in = _check_layer(weight, bias)
    _check_real(damp, "damp", 0.0)
    _check_dtype(dtype)
    mode = _check_selection(sparsity, pattern, mask, out, n_in, block_size)
    _check_sweep_extras(gram, budget, factor, damp, (out, n_in), removed)
    if gram is not None:
        gram = gram.to(device=weight.device, dtype=dtype)
    w = _augment(weight, bias, dtype)
    u, dead = _factor_in(gram, factor, damp, w)
    # kept only to measure the error: one layer-sized matrix less otherwise
    original = w.clone() if measure_error and gram is not None else None
    keep, gone = _starting_masks(mask, removed, out, n_in, weight.device)
    _sweep(w, u, keep, mode, float(sparsity), block_size, dead, budget=budget, removed=gone)
    error = _quadratic(w - original, gram) if original is not None and gram is not None else math.nan
    logger.debug("obs_sweep %dx%d %s: kept %d, error %.6g", out, n_in, mode, int(keep[:, :n_in].sum()), error)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return ObsResult(
        weight=w[:, :n_in].to(weight.dtype), bias=w[:, n_in].to(bias_dtype), mask=keep[:, :n_in].clone(), error=error
    )


# --------------------------------------------------------------------------- exact refit


def _chunk_stop(sizes: list[int], start: int) -> int:
    """End of a chunk of rows, sorted by support size, whose padded systems fit the entry budget."""
    stop = min(len(sizes), start + max(1, _MAX_BATCH_ENTRIES // sizes[start] ** 2))
    return start + max(1, min(stop - start, _MAX_BATCH_ENTRIES // sizes[stop - 1] ** 2))


def _solve_grouped(
    system: torch.Tensor,
    rhs: torch.Tensor,
    supports: torch.Tensor,
    inverse: torch.Tensor,
    ridge: tuple[float, torch.Tensor],
) -> torch.Tensor:
    """One factorisation per distinct support, shared by all rows with that support; each row of
    ``rhs`` is overwritten by its solution (rows are solved once: no second matrix of their size)."""
    for group in range(supports.shape[0]):
        cols = torch.nonzero(supports[group]).flatten()
        rows = torch.nonzero(inverse == group).flatten()
        block = system[cols[:, None], cols[None, :]]
        block.diagonal().add_(ridge[1][cols])
        factor = _cholesky_or_raise(block, ridge[0])
        solved = torch.cholesky_solve(rhs[rows[:, None], cols[None, :]].T, factor).T
        rhs[rows] = 0
        rhs[rows[:, None], cols[None, :]] = solved
    return rhs


def _solve_padded(
    system: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor, ridge: tuple[float, torch.Tensor]
) -> torch.Tensor:
    """Batched per-row solves, each padded to its chunk's largest support with identity rows; each row
    of ``rhs`` is overwritten by its solution."""
    sizes = keep.sum(dim=1)
    order = torch.argsort(sizes, stable=True)
    sorted_sizes = sizes[order].tolist()
    piece_entries = _MAX_PIECE_ENTRIES if system.device.type == "cpu" else _MAX_BATCH_ENTRIES
    start = 0
    while start < len(sorted_sizes):
        stop = _chunk_stop(sorted_sizes, start)
        width = sorted_sizes[stop - 1]
        step = _piece_rows(piece_entries, width, system.element_size())
        for first in range(start, stop, step):
            rows = order[first : min(first + step, stop)]
            _solve_rows(system, rhs, _Rows(rows, keep, sizes, width), ridge)
        start = stop
    return rhs


def _piece_rows(entries: int, width: int, element_size: int) -> int:
    """Rows per piece of a chunk padded to ``width``: about ``entries`` matrix entries (at least one row).

    Where whole lines fit, the count is a multiple of the rows that fill whole 64-byte lines with their
    right-hand sides, so every system and vector of a piece sits at the same offset modulo 64 bytes as
    in one batch of the whole chunk (LAPACK's rounding can depend on that alignment; the pieces then
    give the chunk's results bit for bit). Wide systems are solved a few at a time instead: memory
    stays within ``entries`` or one system, and the results agree with the chunk's to rounding.
    """
    line = 64 // math.gcd(64, width * element_size)
    fit = entries // width**2
    return fit // line * line if fit >= line else max(1, fit)


@dataclass
class _Rows:
    """Rows of a refit solved together: ``keep`` and ``sizes`` (kept per row) of every row of the
    layer, every system padded to ``width``."""

    rows: torch.Tensor
    keep: torch.Tensor
    sizes: torch.Tensor
    width: int


def _solve_rows(system: torch.Tensor, rhs: torch.Tensor, part: _Rows, ridge: tuple[float, torch.Tensor]) -> None:
    """Solve ``part``'s rows, overwriting their rows of ``rhs`` with the solutions: their systems are
    gathered from the undamped ``system`` with the ridge ``ridge[1]`` added to the kept diagonal;
    padding slots hold the identity and a zero right-hand side, and their results are dropped."""
    n, rows, width = system.shape[0], part.rows, part.width
    valid = torch.arange(width, device=rows.device)[None, :] < part.sizes[rows][:, None]
    # each row's kept columns first (ascending), then the others (the padding slots); sorted here,
    # for these rows only: the whole layer's order would be another (out, in) index matrix
    idx = torch.argsort((~part.keep[rows]).to(torch.int8), dim=1, stable=True)[:, :width]
    # blocks[r, i, j] = system[idx[r, i], idx[r, j]], gathered through flat indices (faster than 2-D
    # indexing), 32-bit where they fit: half the memory of a piece's indices
    narrow = idx.to(torch.int32) if n * n < 2**31 else idx
    flat = (narrow * n)[:, :, None] + narrow[:, None, :]
    blocks = system.view(-1).index_select(0, flat.view(-1)).view(len(rows), width, width)
    del flat, narrow  # each step frees what it no longer needs: a piece's matrices are its largest memory
    blocks.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0)
    diagonal = blocks.diagonal(dim1=1, dim2=2)
    diagonal.add_(ridge[1][idx]).masked_fill_(~valid, 1)
    del diagonal
    factor = _cholesky_or_raise(blocks, ridge[0])
    del blocks
    values = rhs[rows[:, None], idx].masked_fill_(~valid, 0)
    solved = torch.cholesky_solve(values[:, :, None], factor)[:, :, 0]
    rhs[rows] = 0
    rhs[rows[:, None].expand_as(idx)[valid], idx[valid]] = solved[valid]


def _check_refit(
    weight: object,
    bias: object,
    mask: object,
    gram: object,
    *,
    cross: object,
    dense_weight: object,
    dense_bias: object,
    ridge: object,
    dtype: object,
) -> tuple[int, int]:
    """Every check of :func:`refit`'s arguments; returns ``(out, in)``."""
    out, n_in = _check_layer(weight, bias)
    _check_mask(mask, out, n_in)
    _check_square(gram, "gram", n_in)
    if cross is not None:
        _check_square(cross, "cross", n_in)
    if dense_weight is not None:
        _check_layer(dense_weight, dense_bias, "dense_weight", "dense_bias")
        if dense_weight.shape != weight.shape:  # type: ignore[attr-defined]  # tensors, checked above
            raise ValueError(
                f"argument 'dense_weight' must have the shape of 'weight' {tuple(weight.shape)}, "  # type: ignore[attr-defined]
                f"got {tuple(dense_weight.shape)}"  # type: ignore[attr-defined]
            )
    elif dense_bias is not None:
        raise ValueError("argument 'dense_bias' was given without 'dense_weight'; pass both or neither")
    _check_real(ridge, "ridge", 0.0)
    _check_dtype(dtype)
    return out, n_in


def _right_hand_side(
    current: tuple[torch.Tensor, torch.Tensor | None],
    target: tuple[torch.Tensor, torch.Tensor | None] | None,
    coupling: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """``W~target C^T + lam W~current`` in ``coupling``'s dtype. The augmented layers live only here,
    one at a time beside the result where there is a target: (out, in + 1) float64 matrices add up."""
    if target is None:
        augmented = _augment(*current, coupling.dtype)
        rhs = augmented @ coupling.T
    else:
        rhs = _augment(*target, coupling.dtype) @ coupling.T
        augmented = _augment(*current, coupling.dtype)
    rhs += augmented.mul_(lam)  # in place: lam * W~current is not a third matrix
    return rhs


@torch.no_grad()
def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    gram: torch.Tensor,
    *,
    cross: torch.Tensor | None = None,
    dense_weight: torch.Tensor | None = None,
    dense_bias: torch.Tensor | None = None,
    ridge: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ridge least-squares weights for a fixed mask; returns new (weight, bias).

    For every row i with support K_i = kept inputs plus the bias this solves
    ``(H_pp[K,K] + lam I) w_K = (C W~d_i^T)[K] + lam W~0_i[K]``, i.e. it minimises
    ``sum_s w_s (w~_i . x~p_s - W~d_i . x~d_s)^2 + lam ||w~_i - W~0_i||^2`` over w~_i on K_i.

    Args:
        weight, bias: current layer W~0 (the ridge centre); bias None means zeros.
        mask: (out, in) bool, True = keep. The bias is always kept.
        gram: H_pp, Gram of the augmented inputs the PRUNED network feeds this layer.
        cross: C = sum_s w_s x~p_s x~d_s^T with the DENSE network's inputs; None means the two
            input streams coincide (C = H_pp).
        dense_weight, dense_bias: W~d, the dense layer (dense_bias None: zeros); dense_weight None
            means the current layer, so without ``cross`` the target is the layer's own output.
        ridge: lam = ridge * damping_scale(H_pp) (default 0.01; the mean diagonal about the inputs'
            means): keeps the solve well posed for dead or collinear inputs and shrinks towards the
            current weights.
    """
    out, n_in = _check_refit(
        weight,
        bias,
        mask,
        gram,
        cross=cross,
        dense_weight=dense_weight,
        dense_bias=dense_bias,
        ridge=ridge,
        dtype=dtype,
    )
    system = gram.to(device=weight.device, dtype=dtype).contiguous()  # systems are gathered from its flat view
    coupling = system if cross is None else cross.to(device=weight.device, dtype=dtype)
    lam = damping_diagonal(system, ridge)  # per column: the bias of a centred system is not ridged
    target = None if dense_weight is None else (dense_weight, dense_bias)
    rhs = _right_hand_side((weight, bias), target, coupling, lam)
    # The ridge lam * I is added to each row's gathered system, not to a copy of the whole matrix.
    bias_kept = torch.ones(out, 1, dtype=torch.bool, device=weight.device)
    keep = torch.cat([mask.to(weight.device), bias_kept], dim=1)
    supports, inverse = torch.unique(keep, dim=0, return_inverse=True)
    if supports.shape[0] <= _MAX_GROUPED_SUPPORTS:
        solution = _solve_grouped(system, rhs, supports, inverse, (ridge, lam))
    else:
        solution = _solve_padded(system, rhs, keep, (ridge, lam))
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return solution[:, :n_in].to(weight.dtype), solution[:, n_in].to(bias_dtype)


@torch.no_grad()
def reconstruction_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor | None,
    gram: torch.Tensor,
) -> float:
    """Sum over rows of ``(w~_new - w~_old)^T H (w~_new - w~_old)`` (float64): the weighted squared
    change of the layer's output over the samples that built ``gram``."""
    _check_layer(weight, bias)
    _check_layer(new_weight, new_bias, "new_weight", "new_bias")
    if new_weight.shape != weight.shape:
        raise ValueError(
            f"argument 'new_weight' must have the shape of 'weight' {tuple(weight.shape)}, "
            f"got {tuple(new_weight.shape)}"
        )
    _check_square(gram, "gram", weight.shape[1])
    delta = _augment(new_weight, new_bias, torch.float64) - _augment(weight, bias, torch.float64)
    return _quadratic(delta, gram)
