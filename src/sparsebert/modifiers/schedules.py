"""Pure schedule functions: sparsity interpolation (GMP) and learning-rate functions.

Gradual magnitude pruning's cubic schedule is Zhu & Gupta 2017 ("To prune, or not to prune",
arXiv:1710.01878): s(t) = s_f + (s_i - s_f) * (1 - p)^3 with p the progress in [0, 1].
Names follow SparseML's ``inter_func`` and ``lr_func`` recipe values.
"""

from __future__ import annotations

__all__ = ["INTER_FUNCS", "LR_FUNCS", "interpolate", "learning_rate"]

INTER_FUNCS = ("linear", "cubic", "inverse_cubic")
LR_FUNCS = ("linear", "cyclic_linear", "constant", "cosine")


def _progress(epoch: float, start: float, end: float) -> float:
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / (end - start), 0.0), 1.0)


def interpolate(epoch: float, start: float, end: float, init: float, final: float, inter_func: str = "cubic") -> float:
    """Value of a scheduled quantity (e.g. sparsity) at ``epoch``.

    Args:
        epoch: current fractional epoch.
        start, end: schedule range in epochs; before ``start`` the value is ``init``, after
            ``end`` it is ``final``.
        init, final: values at the range ends.
        inter_func: ``linear``; ``cubic`` (fast early, Zhu & Gupta 2017); ``inverse_cubic``
            (slow early).

    Raises:
        ValueError: unknown ``inter_func``.
    """
    p = _progress(epoch, start, end)
    if inter_func == "linear":
        f = p
    elif inter_func == "cubic":
        f = 1.0 - (1.0 - p) ** 3
    elif inter_func == "inverse_cubic":
        f = p**3
    else:
        raise ValueError(f"unknown inter_func {inter_func!r}; expected one of {INTER_FUNCS}")
    return init + (final - init) * f


def learning_rate(
    epoch: float,
    lr_func: str,
    start: float,
    end: float,
    init_lr: float,
    final_lr: float,
    cycle_epochs: float | None = None,
) -> float:
    """SparseML ``LearningRateFunctionModifier`` value at ``epoch`` (inside ``[start, end]``).

    ``linear`` goes from ``init_lr`` at ``start`` to ``final_lr`` at ``end``;
    ``cyclic_linear`` restarts that ramp every ``cycle_epochs`` (SparseML's ``cyclic_linear``, used by
    the oBERT recipes; a sawtooth form of Smith 2017, "Cyclical Learning Rates for Training Neural
    Networks", arXiv:1506.01186); ``cosine`` anneals from ``init_lr`` to ``final_lr`` without restarts
    (Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts",
    arXiv:1608.03983); ``constant`` stays at ``init_lr``. Returns the learning rate (float).

    Raises:
        ValueError: unknown ``lr_func``, or ``cyclic_linear`` without a positive ``cycle_epochs``.
    """
    import math

    if lr_func == "constant":
        return init_lr
    if lr_func == "linear":
        return init_lr + (final_lr - init_lr) * _progress(epoch, start, end)
    if lr_func == "cosine":
        p = _progress(epoch, start, end)
        return final_lr + 0.5 * (init_lr - final_lr) * (1 + math.cos(math.pi * p))
    if lr_func == "cyclic_linear":
        if not cycle_epochs or cycle_epochs <= 0:
            raise ValueError("cyclic_linear needs cycle_epochs > 0")
        phase = ((max(epoch, start) - start) % cycle_epochs) / cycle_epochs
        return init_lr + (final_lr - init_lr) * phase
    raise ValueError(f"unknown lr_func {lr_func!r}; expected one of {LR_FUNCS}")
