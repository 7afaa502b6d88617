"""The Optimal BERT Surgeon (oBERT): Kurtic et al. 2022, arXiv:2203.07259; SparseML's OBSPruningModifier.

Second-order pruning with a block-diagonal approximation of the loss Hessian: the damped
empirical Fisher ``F = damp*I + (1/m) sum_k g_k g_k^T`` over ``m`` mini-batch gradients,
restricted to blocks of ``B = fisher_block_size`` consecutive weights of each flattened tensor.
Its inverse is built directly with Woodbury rank-1 updates (never inverting a matrix), batched
over all blocks of a tensor. From ``F^-1`` (paper, eqs. 3-5, Q a set of weights):

* saliency (loss increase when pruning Q, after the optimal update of the others):
  ``rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q``; for one weight ``rho_i = w_i^2 / (2 [F^-1]_ii)``;
* optimal update of the remaining weights: ``delta_w = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q``.

Memory: ``numel * B`` floats per tensor (B=50: 200 bytes per weight in float32), for all pruned
tensors at once while the gradients are sampled; freed after the pruning step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional

import torch
from pydantic import ValidationInfo, field_validator
from tqdm import tqdm

from ..base import ModifierState
from ..masks import compute_masks, mask_sparsity, parse_mask_type
from .base import GradualPruningModifier

__all__ = ["BlockFisherInverse", "obs_saliency", "obs_update", "OBSPruningModifier"]

logger = logging.getLogger(__name__)

# Blocks solved at once in obs_update: bounds the temporary copies (8192 * 50^2 * 4 B = 82 MB).
_SOLVE_CHUNK = 8192


class BlockFisherInverse:
    """Block-diagonal inverse of the damped empirical Fisher of one flattened tensor.

    Args:
        numel: weights in the tensor (``d``); the last block is zero-padded up to ``B``.
        block_size: ``B``, weights per diagonal block.
        num_grads: ``m``, the number of gradients that will be added (the ``1/m`` of ``F``).
        damp: ``lambda`` of ``F = lambda*I + (1/m) G^T G``.
        device, dtype: where ``f_inv`` lives (float32 keeps ``d*B`` floats affordable).

    Attributes:
        f_inv: ``[num_blocks, B, B]``; starts at ``I/damp`` (the inverse of ``damp*I``).
    """

    def __init__(self, numel: int, block_size: int, num_grads: int, damp: float, device=None, dtype=torch.float32):
        self.numel, self.block_size, self.num_grads = numel, block_size, num_grads
        self.num_blocks = math.ceil(numel / block_size)
        eye = torch.eye(block_size, device=device, dtype=dtype) / damp
        self.f_inv = eye.expand(self.num_blocks, block_size, block_size).clone()

    def blocks(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (``numel`` elements, any shape) as ``[num_blocks, B]``, zero-padded, in ``f_inv``'s dtype."""
        v = v.reshape(-1).to(self.f_inv.dtype)
        pad = self.num_blocks * self.block_size - self.numel
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        return v.view(self.num_blocks, self.block_size)

    def add_grad(self, g: torch.Tensor) -> None:
        """Woodbury rank-1 update with gradient ``g``: ``F^-1 -= F^-1 g g^T F^-1 / (m + g^T F^-1 g)``.

        Args:
            g: the gradient of the tensor, any shape with ``numel`` elements (flattened in row-major
                order, zero-padded to whole blocks) and any floating dtype (cast to ``f_inv``'s dtype).
        """
        g = self.blocks(g)
        fg = torch.bmm(self.f_inv, g.unsqueeze(2)).squeeze(2)  # [nb, B]
        denom = self.num_grads + (g * fg).sum(dim=1)  # > m > 0: F^-1 is positive definite
        fg /= denom.sqrt().unsqueeze(1)  # so the update is one symmetric outer product
        self.f_inv.baddbmm_(fg.unsqueeze(2), fg.unsqueeze(1), alpha=-1.0)

    def diag(self) -> torch.Tensor:
        """``[F^-1]_ii`` for every weight, ``[numel]``."""
        return torch.diagonal(self.f_inv, dim1=1, dim2=2).reshape(-1)[: self.numel]

    def group_blocks(self, group: int) -> torch.Tensor:
        """``[F^-1]_QQ`` for consecutive groups Q of ``group`` weights: ``[numel // group, group, group]``.

        ``group`` must divide ``B`` (so no group straddles two Fisher blocks).
        """
        nb, b = self.num_blocks, self.block_size
        view = self.f_inv.view(nb, b // group, group, b // group, group)
        sub = torch.diagonal(view, dim1=1, dim2=3).permute(0, 3, 1, 2)  # [nb, B/g, g, g]
        return sub.reshape(-1, group, group)[: self.numel // group]

    def free(self) -> None:
        """Drop ``f_inv`` (the memory is returned when the last reference goes)."""
        self.f_inv = None


def obs_saliency(w: torch.Tensor, finv: BlockFisherInverse, group: int = 1) -> torch.Tensor:
    """OBS saliency (estimated loss increase when pruned) per weight, shaped like ``w``.

    ``group == 1``: ``rho_i = w_i^2 / (2 [F^-1]_ii)``. ``group > 1`` (block4: 4): for each run Q
    of ``group`` consecutive weights ``rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q``, repeated on each
    of its elements (so a mask pattern that averages a group's scores sees ``rho_Q``).
    Returned in ``finv``'s dtype.
    """
    flat = w.detach().reshape(-1).to(finv.f_inv.dtype)
    if group == 1:
        rho = flat.pow(2) / (2 * finv.diag().clamp_min(torch.finfo(flat.dtype).tiny))
    else:
        wq = flat.view(-1, group)
        x = torch.linalg.solve(finv.group_blocks(group), wq.unsqueeze(2)).squeeze(2)
        rho = (0.5 * (wq * x).sum(dim=1)).repeat_interleave(group)
    return rho.view(w.shape)


@torch.no_grad()
def obs_update(w: torch.Tensor, finv: BlockFisherInverse, prune: torch.Tensor) -> torch.Tensor:
    """The multi-weight OBS update when the weights flagged in ``prune`` are removed.

    In each Fisher block, with Q the flagged weights of that block,
    ``delta = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q`` (paper eq. 4 for a set Q); it sets ``w_Q`` to
    zero (up to rounding) and moves the other weights of the block to compensate. Blocks are
    independent (block-diagonal Fisher), so all blocks are solved in one batch: the matrix
    ``P F^-1 P + (I - P)`` (``P`` = diag of the flags) is ``[F^-1]_QQ`` on Q and the identity
    elsewhere, so solving it against ``P w`` gives ``([F^-1]_QQ)^-1 w_Q`` on Q and 0 elsewhere.

    Args:
        w: the weight (any shape, ``numel`` elements).
        finv: its :class:`BlockFisherInverse`.
        prune: bool, shaped like ``w``: weights pruned now.

    Returns:
        ``delta``, shaped like ``w``, in ``w``'s dtype (add it, then zero the pruned weights).
    """
    wb, pb = finv.blocks(w.detach()), finv.blocks(prune).bool()
    delta = torch.zeros_like(wb)
    rows = pb.any(dim=1).nonzero().squeeze(1)  # only blocks that lose a weight change
    for chunk in rows.split(_SOLVE_CHUNK):
        f = finv.f_inv[chunk]  # [k, B, B]
        p = pb[chunk].to(wb.dtype)
        system = f * (p.unsqueeze(2) * p.unsqueeze(1))
        system.diagonal(dim1=1, dim2=2).add_(1 - p)  # identity on the weights that stay
        x = torch.linalg.solve(system, (p * wb[chunk]).unsqueeze(2))
        delta[chunk] = -torch.bmm(f, x).squeeze(2)
    return delta.reshape(-1)[: finv.numel].view(w.shape).to(w.dtype)


class OBSPruningModifier(GradualPruningModifier):
    """Gradual oBERT pruning (Kurtic et al. 2022, arXiv:2203.07259) on the GMP schedule.

    At every scheduled pruning step: sample ``num_grads`` mini-batch gradients through
    ``state.grad_sampler``, build the block Fisher inverse of every param, rank weights by OBS
    saliency (per layer, or across layers with ``global_sparsity`` as in the paper), prune,
    and apply the optimal OBS update to the remaining weights of each Fisher block.

    Recipe keys (SparseML's), besides the :class:`GradualPruningModifier` schedule keys:

    * ``num_grads`` (1024): gradients ``m`` in the empirical Fisher.
    * ``damp`` (1e-7): the dampening ``lambda``.
    * ``fisher_block_size`` (50): ``B``; a multiple of the mask group (4 for ``block4``).
    * ``num_recomputations`` (1): split each step's sparsity increase into this many equal
      (linear) sub-steps, re-sampling gradients and rebuilding ``F^-1`` in between.
    * ``grad_sampler_kwargs``: accepted for SparseML recipes; here each gradient is one batch
      of the sampler given by the integration (under ``SparseTrainer``: the Trainer's training
      DataLoader and its batch size; in :func:`~sparsebert.oneshot.oneshot`: its ``batch_size``),
      so ``batch_size`` in it is not applied.

    ``mask_type``: ``unstructured``, ``block4`` (or ``[1, B]`` blocks); not N:M.
    Pruned weights keep saliency ``-inf`` (masks only grow) and are left out of the Fisher
    (their gradients are masked), which makes ``F^-1`` that of the remaining weights only.

    Example::

        - !OBSPruningModifier
          params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
          init_sparsity: 0.7
          final_sparsity: 0.9
          start_epoch: 2.0
          end_epoch: 26.0
          update_frequency: 4.0
          global_sparsity: true
          mask_type: block4
          num_grads: 1024
          damp: 1e-7
          fisher_block_size: 52
    """

    num_grads: int = 1024
    damp: float = 1e-7
    fisher_block_size: int = 50
    num_recomputations: int = 1
    grad_sampler_kwargs: Optional[dict[str, Any]] = None

    @field_validator("mask_type")
    @classmethod
    def _obs_mask_type(cls, v):
        if parse_mask_type(v).kind == "nm":
            raise ValueError("OBSPruningModifier supports unstructured and block4 masks, not N:M")
        return v

    @field_validator("num_grads", "fisher_block_size", "num_recomputations")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("damp")
    @classmethod
    def _positive_damp(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("damp must be > 0")
        return float(v)

    @field_validator("fisher_block_size")
    @classmethod
    def _block_fits_group(cls, v: int, info: ValidationInfo) -> int:
        mask_type = info.data.get("mask_type")  # absent when mask_type itself was invalid
        group = parse_mask_type(mask_type).group if mask_type is not None else 1
        if v % group:
            raise ValueError(f"fisher_block_size must be a multiple of {group} for mask_type {mask_type!r} "
                             "(a mask group may not straddle two Fisher blocks)")
        return v

    def scores(self, state: ModifierState) -> dict[str, torch.Tensor]:
        """OBS saliencies (higher = keep) from freshly sampled gradients; pruned weights get ``-inf``.

        Returns:
            param name -> saliency shaped like the param, in the Fisher inverse's dtype (float64 for
            float64 params, else float32; see :func:`obs_saliency`).

        Raises:
            RuntimeError: ``state.grad_sampler`` is ``None`` or yields no batches.
        """
        finvs = self._fisher_inverses(state)
        with torch.no_grad():
            out = {name: self._saliency(name, finvs[name]) for name in self._params}
        for f in finvs.values():
            f.free()
        return out

    def prune(self, state: ModifierState, sparsity: float) -> None:
        """Raise sparsity to ``sparsity`` in ``num_recomputations`` OBS sub-steps (masks + weight updates).

        Raises:
            RuntimeError: ``state.grad_sampler`` is ``None`` (OBS needs gradients).
        """
        current = self._sparsity if self._masks else 0.0
        if sparsity <= current + 1e-12:  # nothing new to prune: no gradients needed
            if not self._masks:
                self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self._params.items()}
            self.apply_masks()
            return
        for i in range(1, self.num_recomputations + 1):
            self._obs_step(state, current + (sparsity - current) * i / self.num_recomputations)

    def _obs_step(self, state: ModifierState, sparsity: float) -> None:
        start = time.perf_counter()
        finvs = self._fisher_inverses(state)
        with torch.no_grad():
            self._prune_with(finvs, sparsity)
        logger.info("%s: OBS pruning step done in %.1f s: sparsity %.4f (target %.4f)",
                    self._where or "OBSPruningModifier", time.perf_counter() - start, self._sparsity, sparsity)

    def _prune_with(self, finvs: dict[str, BlockFisherInverse], sparsity: float) -> None:
        scores = {name: self._saliency(name, finvs[name]) for name in self._params}
        old = self._masks
        masks = compute_masks(scores, sparsity, self.pattern, self.global_sparsity)
        del scores
        for name, p in self._params.items():
            newly = ~masks[name] if name not in old else old[name] & ~masks[name]
            if newly.any():
                p.add_(obs_update(p, finvs[name], newly))
            finvs[name].free()  # free each F^-1 as soon as its tensor is done
        self._masks = masks
        self._sparsity = mask_sparsity(masks)
        self.apply_masks()  # the update leaves ~0 on pruned weights; make them exactly 0

    def _saliency(self, name: str, finv: BlockFisherInverse) -> torch.Tensor:
        rho = obs_saliency(self._params[name], finv, self.pattern.group)
        if name in self._masks:
            rho = rho.masked_fill(~self._masks[name], float("-inf"))  # masks stay monotone
        return rho

    def _fisher_inverses(self, state: ModifierState) -> dict[str, BlockFisherInverse]:
        """Sample ``num_grads`` gradients and build every param's block Fisher inverse."""
        if state.grad_sampler is None:
            raise RuntimeError(
                f"{self._where or 'OBSPruningModifier'}: OBS pruning needs gradients, but no grad sampler is set: "
                "train with sparsebert's SparseTrainer / RecipeCallback integration, use sparsebert.oneshot.oneshot(), "
                "or set session.state.grad_sampler")
        finvs = {
            name: BlockFisherInverse(p.numel(), self.fisher_block_size, self.num_grads, self.damp, p.device,
                                     torch.float64 if p.dtype == torch.float64 else torch.float32)
            for name, p in self._params.items()
        }
        start, seen = time.perf_counter(), 0
        # each gradient is a forward/backward pass (minutes in all for bert-base): show progress
        # one bar per job, not per process under torchrun
        bar = tqdm(total=self.num_grads, desc="OBS Fisher", unit="grad", leave=False,
                   disable=os.environ.get("RANK", "0") != "0")
        with torch.enable_grad(), bar:  # the sampler back-propagates, even when prune() is called under no_grad
            for _ in state.grad_sampler(self.num_grads):
                with torch.no_grad():
                    for name, p in self._params.items():
                        if p.grad is None:  # frozen or unused: a zero gradient changes nothing
                            continue
                        g = p.grad.detach()
                        if name in self._masks:  # pruned weights stay out of the Fisher (decoupled from the rest)
                            g = g * self._masks[name]
                        finvs[name].add_grad(g)
                seen += 1
                bar.update(1)
        if seen == 0:
            raise RuntimeError("the grad sampler yielded no batches: no data to estimate the Fisher from")
        logger.info("%s: OBS Fisher inverse from %d gradients in %.1f s",
                    self._where or "OBSPruningModifier", seen, time.perf_counter() - start)
        if seen < self.num_grads:
            logger.warning("OBS: the grad sampler gave %d of num_grads=%d gradients; the Fisher is scaled as if %d",
                           seen, self.num_grads, self.num_grads)
        return finvs
