"""Pure mask functions: unstructured, block4 and N:M patterns, per-layer or global.

A mask is a ``torch.bool`` tensor shaped like the weight (``True`` = kept). Scores are
importance values (higher = keep), e.g. ``|w|`` for magnitude pruning (Han et al. 2015, "Learning
both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626),
OBS saliencies for oBERT (Kurtic et al. 2022, arXiv:2203.07259).

Patterns (the weight is ``[out_features, in_features]``; groups run along ``in_features``,
the dimension a CPU kernel streams over):

* ``unstructured`` -- any element.
* ``block4`` -- groups of 4 consecutive weights are kept or pruned together (SparseML's
  ``block4``, DeepSparse's 4-block); a group's score is the mean of its elements' scores.
* ``"N:M"`` -- at most N of every M consecutive weights are kept (e.g. ``2:4``, NVIDIA's
  semi-structured sparsity). For sparsity below ``1 - N/M`` (a gradual schedule), only the
  ``M - N`` lowest-scored weights of each group are candidates, pruned lowest-first; at
  ``1 - N/M`` all candidates are pruned and the mask is exactly N:M. Source: Mishra et al. 2021,
  "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378.
"""

from __future__ import annotations

import dataclasses
import re

import torch

__all__ = ["MaskPattern", "parse_mask_type", "compute_masks", "mask_sparsity", "detect_pattern"]


@dataclasses.dataclass(frozen=True)
class MaskPattern:
    """A sparsity pattern: ``kind`` in {unstructured, block, nm}; ``block`` or ``n``/``m`` sizes."""

    kind: str
    block: int = 1
    n: int = 0
    m: int = 0

    @property
    def group(self) -> int:
        """Consecutive weights along ``in_features`` that the pattern ties together."""
        return self.block if self.kind == "block" else (self.m if self.kind == "nm" else 1)

    @property
    def max_sparsity(self) -> float:
        """The highest sparsity the pattern admits (``1 - N/M`` for N:M, else < 1)."""
        return (self.m - self.n) / self.m if self.kind == "nm" else 1.0

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "block": f"block{self.block}", "nm": f"{self.n}:{self.m}"}[self.kind]


def parse_mask_type(mask_type: str | list) -> MaskPattern:
    """Parse SparseML's ``mask_type``: ``unstructured``, ``block4`` (or ``block``), ``[1, 4]``, ``"N:M"``.

    Raises:
        ValueError: anything else, or N:M with N >= M or N < 1.
    """
    if isinstance(mask_type, (list, tuple)):
        if len(mask_type) == 2 and mask_type[0] == 1 and int(mask_type[1]) >= 1:
            b = int(mask_type[1])
            return MaskPattern("unstructured") if b == 1 else MaskPattern("block", block=b)
        raise ValueError(f"mask_type {mask_type!r}: only [1, B] blocks are supported")
    s = str(mask_type).strip().lower()
    if s == "unstructured":
        return MaskPattern("unstructured")
    if s in ("block", "block4"):
        return MaskPattern("block", block=4)
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n_, m_ = int(m.group(1)), int(m.group(2))
        if not 1 <= n_ < m_:
            raise ValueError(f"mask_type {mask_type!r}: N:M needs 1 <= N < M")
        return MaskPattern("nm", n=n_, m=m_)
    raise ValueError(f"mask_type {mask_type!r}: expected unstructured, block4 or 'N:M' (e.g. '2:4')")


def _group_scores(score: torch.Tensor, pattern: MaskPattern) -> torch.Tensor:
    """Flat per-group scores. ``score``: [out, in] (or any shape for unstructured)."""
    if pattern.kind == "unstructured":
        return score.reshape(-1)
    if pattern.kind == "block":
        return score.reshape(score.shape[0], -1, pattern.block).mean(dim=-1).reshape(-1)
    # N:M: within each group of M, only the M-N lowest are candidates; others get +inf.
    groups = score.reshape(score.shape[0], -1, pattern.m).float()
    order = groups.argsort(dim=-1)
    protected = torch.zeros_like(groups, dtype=torch.bool)
    protected.scatter_(-1, order[..., pattern.m - pattern.n :], True)
    return groups.masked_fill(protected, float("inf")).reshape(-1)


def _expand(group_mask: torch.Tensor, shape: torch.Size, pattern: MaskPattern) -> torch.Tensor:
    if pattern.kind == "block":
        return group_mask.reshape(shape[0], -1, 1).expand(-1, -1, pattern.block).reshape(shape)
    return group_mask.reshape(shape)


def _keep_top(flat: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask pruning exactly ``round(sparsity * n)`` lowest entries of ``flat``."""
    n_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        # stable sort: ties (e.g. already-zero weights) are broken by position, deterministically
        idx = torch.sort(flat.float(), stable=True).indices[:n_prune]
        keep[idx] = False
    return keep


def check_shape(shape: torch.Size, pattern: MaskPattern) -> str | None:
    """Return why ``pattern`` cannot apply to a weight of ``shape``, or ``None`` if it can."""
    g = pattern.group
    if g > 1:
        if len(shape) != 2:
            return f"{pattern} needs a 2-D weight, got shape {tuple(shape)}"
        if shape[1] % g:
            return f"{pattern} needs in_features divisible by {g}, got shape {tuple(shape)}"
    return None


def compute_masks(
    scores: dict[str, torch.Tensor], sparsity: float, pattern: MaskPattern, global_sparsity: bool = False
) -> dict[str, torch.Tensor]:
    """Masks that prune the lowest-scored weights (or groups) to ``sparsity``.

    Args:
        scores: parameter name -> score tensor shaped like the weight (higher = keep).
        sparsity: fraction in [0, 1) of weights to prune (for N:M at most ``1 - N/M``).
        pattern: from :func:`parse_mask_type`.
        global_sparsity: one ranking across all tensors (layers end with different
            sparsities) instead of ``sparsity`` in each tensor.

    Returns:
        name -> ``torch.bool`` mask, same shape and device as the score.

    Raises:
        ValueError: sparsity outside [0, 1) or above the pattern's maximum; a shape the
            pattern cannot tile.
    """
    if not 0.0 <= sparsity < 1.0 or sparsity > pattern.max_sparsity + 1e-9:
        bound = "1)" if pattern.max_sparsity >= 1.0 else f"{pattern.max_sparsity}]"  # N:M keeps N of M: (M-N)/M is reachable
        raise ValueError(f"sparsity {sparsity} outside [0, {bound} for {pattern}")
    for name, s in scores.items():
        why = check_shape(s.shape, pattern)
        if why:
            raise ValueError(f"{name}: {why}")
    group_sparsity = sparsity  # for block4 a fraction of blocks = the same fraction of weights
    if global_sparsity:
        flats = {k: _group_scores(s, pattern) for k, s in scores.items()}
        keep = _keep_top(torch.cat([f.cpu() for f in flats.values()]), group_sparsity)
        out, offset = {}, 0
        for k, f in flats.items():
            out[k] = _expand(keep[offset : offset + f.numel()].to(f.device), scores[k].shape, pattern)
            offset += f.numel()
        return out
    return {k: _expand(_keep_top(_group_scores(s, pattern), group_sparsity), s.shape, pattern) for k, s in scores.items()}


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of pruned (``False``) entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def detect_pattern(weight: torch.Tensor) -> str:
    """Name the zero pattern of a weight: ``"dense"``, ``"block4"``, ``"1:4"``, ``"2:4"`` or ``"unstructured"``.

    ``"dense"`` when no weight is zero. The other patterns are only checked on a 2-D ``[out, in]`` weight
    with ``in % 4 == 0`` (anything else with zeros is ``"unstructured"``): the first of ``block4``, ``1:4``,
    ``2:4`` that every group of 4 consecutive inputs satisfies is reported. Other N:M patterns are not
    detected.
    """
    zeros = weight == 0
    if not zeros.any():
        return "dense"
    if weight.dim() == 2 and weight.shape[1] % 4 == 0:
        g = zeros.reshape(weight.shape[0], -1, 4)
        if (g.all(-1) | (~g).all(-1)).all():
            return "block4"
        nz = (~g).sum(-1)
        for n in (1, 2):
            if (nz <= n).all():
                return f"{n}:4"
    return "unstructured"
