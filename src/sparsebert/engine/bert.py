"""``compile()``: a BERT model as a fast CPU inference callable with sparse Linear kernels.

The encoder's six Linear layers per block (query/key/value fused into one ``[3H, H]`` weight,
attention output, intermediate, output) are packed once into :class:`SparseLinear` (FP32) or
:class:`SparseLinearInt8` (INT8), each choosing its own format from its weight (dense BLAS for
weights too dense to gain, csr or block4 otherwise). Attention runs in the fused kernel of
``kernels/attention.cpp`` on AVX-512 CPUs (on feature-major Q/K/V that the QKV layer writes with
``y_t``; its context goes to the attention-output layer as ``x_t``), else as torch's
``scaled_dot_product_attention``; each residual add + LayerNorm is one pass (``kernels/layernorm.cpp``).
Where the batch splits over the threads (and the layers are sparse formats), QKV, attention and the
attention output run as one kernel call a sequence per thread (:func:`_attention_block`): the
sequence's projections and context stay in that thread's cache. The fused kernels (attention block,
FFN) finish their rows with the residual add + LayerNorm while the rows are in cache.
The Hugging Face embeddings module, pooler and task head stay torch (FP32 in both precisions).

Activations are token-major ``[batch * seq, H]`` (measured faster than feature-major for the FFN
at batch 32). GELU/ReLU run in the FFN1 kernel's epilogue. Once the tokens fill a 64-token tile
per thread, both FFN layers run as one kernel call (:func:`.sparse_linear.fused_ffn`, INT8
:func:`.quantized_linear.fused_ffn_int8`): the ``[tokens, 4H]`` hidden activations never leave the cache.
Intermediate activations go to per-thread buffers reused from call to call (``_Workspace``), so a
batch-32 forward does not page-fault ~1.3 GB of fresh memory in.

INT8 (``precision="int8"``): the encoder Linear layers use per-output-channel symmetric int8
weights (the QAT scales of ``quantization.json`` when present, QAT-quantized embedding tables
baked in as there) and dynamic 7-bit activations (see :mod:`.quantized_linear`): per tensor for
QKV and FFN1, each range measured by the LayerNorm that wrote the tensor, so no layer makes a
min/max pass of its own; per token for the attention output and FFN2, whose inputs the fused
kernels quantize a tile at a time, in cache. :func:`int8_reference_model` builds the fake-quant
PyTorch model that this reproduces.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .loading import EngineError, load_source
from .quantized_linear import SparseLinearInt8, activation_qparams_7bit, fused_ffn_int8, reference_int8_linear
from .sparse_linear import SparseLinear, fused_ffn

__all__ = ["CompiledBert", "compile_model", "int8_reference_model", "PRECISIONS"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
# HF hidden_act -> activation fused into the FFN1 kernel epilogue (others run as HF's module)
_KERNEL_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (restored afterwards)."""
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != before:
            torch.set_num_threads(before)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", "bert"), model)
    if getattr(getattr(model, "config", None), "model_type", None) != "bert" or not hasattr(base, "encoder"):
        raise EngineError(f"the engine compiles BERT models (config.model_type 'bert'); got {type(model).__name__} "
                          f"with model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}")
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise EngineError(f"{type(model).__name__}: only encoder-only BERT with absolute position embeddings is supported")
    return base


@functools.lru_cache(maxsize=None)
def _fused_attention():
    """The compiled fused attention kernel (``attention.cpp``) where it is the fast path (AVX-512 CPUs:
    1.6-2x faster than ``scaled_dot_product_attention`` at seq 128), else ``None`` (SDPA is used)."""
    from . import kernels as _kernels

    mod = _kernels.load()
    if mod is None or not mod.isa().startswith("avx512") or os.environ.get("SPARSEBERT_NO_FUSED_ATTENTION"):
        return None
    return mod.attention_t


def _layernorm_args(ln: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(weight, bias, eps)`` of a LayerNorm, detached: what :func:`_add_layernorm` takes."""
    return ln.weight.detach(), ln.bias.detach(), ln.eps


def _add_layernorm(a: torch.Tensor, residual: torch.Tensor, ln_args: tuple,
                   minmax: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(a + residual)`` over the last dim, in place in ``a`` (float32 ``[M, H]``, contiguous):
    one pass a row in ``layernorm.cpp`` (~2x torch's add_ + layer_norm at batch 1), torch without kernels.
    ``minmax`` (float32 ``[2]``): receives the output's ``(min, max)``, measured in the same pass."""
    from . import kernels as _kernels

    mod = _kernels.load()
    if mod is None:
        y = F.layer_norm(a.add_(residual), (a.shape[-1],), *ln_args)
        if minmax is not None:
            minmax.copy_(torch.stack(torch.aminmax(y)))
        return y
    mod.add_layernorm_(a, residual, ln_args[0], ln_args[1], ln_args[2], torch.get_num_threads(), False, minmax)
    return a


# Packed formats the fused attention block runs (kernel format codes); dense-format layers do not.
_BLOCK_FMT = {"csr": 0, "block4": 1, "q8": 2, "q8p": 3}


def _attention_block(qkv, o, x: torch.Tensor, batch: int, seq: int, heads: int, head_dim: int,
                     mask: torch.Tensor | None, x_range, out: torch.Tensor,
                     add_norm: tuple | None = None) -> torch.Tensor | None:
    """``o(attention(qkv(x)))`` in one kernel call (``attention_block``), or ``None`` where it does not apply.

    ``x`` float32 ``[batch * seq, H]`` -> ``out`` ``[batch * seq, o.out_features]``. One sequence per thread:
    the sequence's ``[3H, seq]`` projections and ``[H, seq]`` context stay in that thread's cache instead
    of going through memory (at batch 32 x 128 tokens, 38 MB + 13 MB a layer each way). Applies on CPUs
    with the fused attention kernel (AVX-512), when both layers are sparse formats of one precision and
    the batch splits evenly enough over the threads (else one sequence per thread would leave cores idle).
    INT8: ``x`` quantized per tensor (``x_range`` = its ``(min, max)`` when known), the context per token.
    ``add_norm``: ``(residual, gamma, beta, eps, minmax)``: each sequence's rows finish as ``LayerNorm(out +
    residual)`` while in cache (``minmax``: ``None`` or float32 ``[2]`` receiving the result's range).
    """
    from . import kernels as _kernels

    threads = torch.get_num_threads()
    if (_fused_attention() is None or qkv.format not in _BLOCK_FMT or o.format not in _BLOCK_FMT
            or batch < threads or (batch % threads and batch < 4 * threads)):
        return None
    int8 = isinstance(qkv, SparseLinearInt8)
    if int8 != isinstance(o, SparseLinearInt8):
        return None
    sx, zp = activation_qparams_7bit(x, x_range) if int8 else (1.0, 0)
    mod = _kernels.load()
    vals = (lambda m: m.qval) if int8 else (lambda m: m.val)
    extra = (lambda m: (m.wscale, m.wsum)) if int8 else (lambda m: (None, None))
    return mod.attention_block(x, None if mask is None else mask.view(batch, seq), batch, seq, heads, head_dim,
                               qkv.order, qkv.row_ptr, qkv.col, vals(qkv), *extra(qkv), qkv.bias, qkv.k_chunk,
                               qkv.n_block, _BLOCK_FMT[qkv.format], o.order, o.row_ptr, o.col, vals(o), *extra(o), o.bias,
                               o.out_features, o.k_chunk, o.n_block, _BLOCK_FMT[o.format], sx, zp, threads, out, False,
                               *(add_norm or ()))


class _Layer:
    """One encoder block: fused QKV, attention output, FFN, two LayerNorms (plain attributes)."""

    def __init__(self, block: torch.nn.Module, make_linear, act: str):
        att = block.attention
        q, k, v = att.self.query, att.self.key, att.self.value
        qkv_w = torch.cat([q.weight, k.weight, v.weight]).detach()
        qkv_b = torch.cat([q.bias, k.bias, v.bias]).detach()
        self.qkv = make_linear(qkv_w, qkv_b, [q, k, v])
        self.o = make_linear(att.output.dense.weight.detach(), att.output.dense.bias.detach(), [att.output.dense])
        self.ffn1 = make_linear(block.intermediate.dense.weight.detach(), block.intermediate.dense.bias.detach(),
                                [block.intermediate.dense])
        self.ffn2 = make_linear(block.output.dense.weight.detach(), block.output.dense.bias.detach(), [block.output.dense])
        # Plain tensors/floats: nn.Module attribute lookups cost ~1 us each, per layer and call.
        self.ln1_args = _layernorm_args(att.output.LayerNorm)
        self.ln2_args = _layernorm_args(block.output.LayerNorm)
        self.heads = att.self.num_attention_heads
        self.head_dim = att.self.attention_head_size
        self.act = act
        self.fused = _KERNEL_ACT.get(act)
        self.act_module = block.intermediate.intermediate_act_fn
        self.int8 = isinstance(self.ffn2, SparseLinearInt8)

    def linears(self) -> dict[str, torch.nn.Module]:
        return {"qkv": self.qkv, "attention_output": self.o, "intermediate": self.ffn1, "output": self.ffn2}

    def __call__(self, x: torch.Tensor, batch: int, seq: int, mask: torch.Tensor | None,
                 ws: "_Workspace") -> torch.Tensor:
        """``x`` float32 ``[batch * seq, hidden]`` -> the block's output: written into ``x`` itself (its last
        reader is the first residual add) unless the FFN2 layer allocates its own (dense MKL path, no kernels);
        never one of the buffers of ``ws``, where the intermediates go."""
        tokens, hidden = x.shape
        # = hidden unless heads were sliced away (sparsebert.slicing); buffer names carry the width so that
        # layers of different widths each keep their own buffer instead of reallocating one per layer
        width = self.heads * self.head_dim
        att = _fused_attention()  # dense-format layers feed it too: their run() transposes for y_t / x_t
        a_buf = ws.get("a", tokens, hidden)
        # INT8 activations: QKV and FFN1 inputs per tensor, their ranges measured by the LayerNorm that
        # wrote them (no min/max pass of their own; ws.x_range is this block's input's); the attention
        # output and FFN2 inputs per token.
        int8 = self.int8
        x1_range = torch.empty(2) if int8 else None  # fresh per call: the model may run in several threads
        # Fused kernels finish with the residual add + LayerNorm themselves (add_norm) while the rows are in cache.
        x1 = _attention_block(self.qkv, self.o, x, batch, seq, self.heads, self.head_dim, mask, ws.x_range, a_buf,
                              (x, *self.ln1_args, x1_range))
        if x1 is None:
            if att is not None:  # feature-major Q/K/V and context: no head split, transpose or copy
                qkv_t = self.qkv.run(x, y_t=True, out=ws.get(f"qkv{width}", 3 * width, tokens), x_range=ws.x_range)  # [3 * width, tokens]
                mask2 = None if mask is None else mask.view(batch, seq)
                ctx_t = att(qkv_t, batch, seq, self.heads, self.head_dim, mask2, torch.get_num_threads(), False,
                            ws.get(f"ctx{width}", width, tokens))
                a = self.o.run(ctx_t, x_t=True, out=a_buf, per_token=True)
            else:
                qkv = self.qkv.run(x, out=ws.get(f"qkv_tokens{width}", tokens, 3 * width), x_range=ws.x_range)
                q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, seq, 3, self.heads, self.head_dim).unbind(2))
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :] if mask is not None else None)
                a = self.o.run(ctx.transpose(1, 2).reshape(tokens, width), out=a_buf, per_token=True)
            x1 = _add_layernorm(a, x, self.ln1_args, x1_range)
        # x is dead from here: FFN2 writes its output into it. Both FFN layers in one kernel call where it
        # applies: the hidden tile stays in cache.
        fused = self.fused
        ws.x_range = torch.empty(2) if int8 else None  # the block output's range: the next block's input range
        add_norm = (x1, *self.ln2_args, ws.x_range)
        y = None
        if fused and int8:
            y = fused_ffn_int8(self.ffn1, self.ffn2, x1, fused, x_range=x1_range, out=x, add_norm=add_norm)
        elif fused:
            y = fused_ffn(self.ffn1, self.ffn2, x1, fused, out=x, add_norm=add_norm)
        if y is not None:
            return y
        h = self.ffn1.run(x1, act=fused, out=ws.get(f"h{self.ffn1.out_features}", tokens, self.ffn1.out_features), x_range=x1_range)
        h = h if fused else self.act_module(h)
        y = self.ffn2.run(h, out=x, per_token=True)
        return _add_layernorm(y, x1, self.ln2_args, ws.x_range)


class _Workspace:
    """Reused activation buffers of one thread's forward calls (the role of ONNX Runtime's memory arena).

    A fresh multi-MB tensor is fresh memory from the OS: every page faults in on first write, and at
    batch 32 the encoder's intermediates are ~110 MB a layer for bert-base. ``get(name, rows, cols)``
    returns the float32 ``[rows, cols]`` buffer ``name``, kept between calls; a call with another token
    count replaces them all, so memory stays one call's worth.
    """

    def __init__(self):
        self.tokens = -1
        self.buffers: dict[str, torch.Tensor] = {}
        self.x_range: torch.Tensor | None = None

    def start(self, tokens: int) -> "_Workspace":
        if tokens != self.tokens:
            self.tokens, self.buffers = tokens, {}
        self.x_range = None  # (min, max) of the next block's input, when the previous block measured it
        return self

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != (rows, cols):
            buf = self.buffers[name] = torch.empty(rows, cols)
        return buf


class CompiledBert(torch.nn.Module):
    """A BERT encoder (+ task head) for CPU inference with packed sparse Linear layers.

    Call as the Hugging Face model: ``model(input_ids, attention_mask=None, token_type_ids=None)``
    with int64 ``[batch, seq]`` tensors (numpy arrays accepted). Returns the Hugging Face output
    class of the task: ``SequenceClassifierOutput`` (``logits`` ``[batch, labels]``),
    ``QuestionAnsweringModelOutput`` (``start_logits``/``end_logits`` ``[batch, seq]``) or
    ``BaseModelOutputWithPooling`` (``last_hidden_state`` ``[batch, seq, H]``, ``pooler_output``),
    float32. Runs under ``torch.inference_mode`` with ``num_threads`` torch/OpenMP threads
    (``None``: torch's current setting), restoring torch's setting afterwards. Each calling thread keeps
    the intermediate buffers of its last call's shape (~110 MB for bert-base at batch 32 x 128), reused
    by its next calls and freed with the thread; returned tensors are never such buffers.

    Attributes: ``task_kind``, ``precision``, ``num_threads``, ``config``, ``source`` (folder or
    ``None``), ``layers`` (per block a dict name -> packed Linear module), ``slicing`` (the
    :class:`~sparsebert.slicing.SliceReport` of :func:`compile_model`, or ``None``).

    Raises (on construction):
        EngineError: ``precision`` not in ``PRECISIONS``; ``num_threads`` not a positive int or ``None``;
            ``model`` is not an encoder-only BERT with absolute position embeddings; ``model`` lacks the
            head of ``task_kind`` (``classifier`` / ``qa_outputs``).
        ValueError: a bad ``pattern``, or a weight that breaks an ``"n:m"`` pattern (from ``from_dense``).
    """

    def __init__(self, model: torch.nn.Module, task_kind: str, precision: str = "fp32", num_threads: int | None = None,
                 pattern: str = "auto", quantization: dict[str, Any] | None = None, source: Path | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise EngineError(f"num_threads must be a positive int or None, got {num_threads!r}")
        base = _base_model(model)
        self.config, self.task_kind, self.precision = model.config, task_kind, precision
        self.num_threads, self.source = num_threads, source
        self.slicing = None  # set by compile_model
        self.embeddings = base.embeddings
        self.pooler = getattr(base, "pooler", None)
        self.head = {"text-classification": getattr(model, "classifier", None),
                     "question-answering": getattr(model, "qa_outputs", None)}.get(task_kind)
        if task_kind != "feature-extraction" and self.head is None:
            raise EngineError(f"{type(model).__name__} has no {task_kind} head")
        names = {m: n for n, m in model.named_modules()}
        qmodules = (quantization or {}).get("modules", {})

        def make_linear(weight, bias, modules):
            if precision == "fp32":
                return SparseLinear.from_dense(weight.float(), bias.float(), pattern=pattern, num_threads=num_threads)
            scales = [qmodules.get(names[m], {}).get("weight_scale") for m in modules]
            scale = None
            if all(s is not None for s in scales):  # QAT scales, one list per fused module
                scale = torch.cat([torch.as_tensor(s, dtype=torch.float32).flatten().expand(m.out_features)
                                   if len(s) == 1 else torch.as_tensor(s, dtype=torch.float32) for s, m in zip(scales, modules)])
            return SparseLinearInt8.from_dense(weight.float(), bias.float(), weight_scale=scale, pattern=pattern,
                                               num_threads=num_threads)

        act = model.config.hidden_act if isinstance(model.config.hidden_act, str) else ""
        self.layers_ = [_Layer(block, make_linear, act) for block in base.encoder.layer]
        # Register the packed modules so .to()/state_dict()/repr see them.
        self.packed = torch.nn.ModuleList(torch.nn.ModuleDict(layer.linears()) for layer in self.layers_)
        # calling thread -> its reused activation buffers (dropped with the thread)
        self._workspaces: weakref.WeakKeyDictionary[threading.Thread, _Workspace] = weakref.WeakKeyDictionary()

    @property
    def layers(self) -> list[dict[str, torch.nn.Module]]:
        """Per encoder layer: its packed Linears by name: ``qkv`` (fused query/key/value), ``attention_output``,
        ``intermediate`` and ``output``."""
        return [layer.linears() for layer in self.layers_]

    def summary(self) -> list[dict[str, Any]]:
        """Per packed Linear: ``layer``, ``name``, ``shape`` ``[N, K]``, ``format``, ``density``."""
        return [{"layer": i, "name": n, "shape": [m.out_features, m.in_features], "format": m.format, "density": round(m.density, 4)}
                for i, layer in enumerate(self.layers) for n, m in layer.items()]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict: bool = True):
        """Inference on int64 ``[batch, seq]`` inputs (tensors or nested lists; ``attention_mask`` 1 = real token).

        Returns the Hugging Face output of the compiled model's head: ``logits`` float32 ``[batch, labels]``,
        ``start_logits``/``end_logits`` ``[batch, seq]``, or ``last_hidden_state`` ``[batch, seq, hidden]``
        (a tuple when ``return_dict`` is false). Runs under ``inference_mode`` with ``num_threads``.

        Raises:
            ValueError: ``input_ids`` is not 2-D.
        """
        from transformers.modeling_outputs import (BaseModelOutputWithPooling, QuestionAnsweringModelOutput,
                                                   SequenceClassifierOutput)

        def as_tensor(a):
            return None if a is None else torch.as_tensor(a, dtype=torch.long)

        input_ids, attention_mask, token_type_ids = map(as_tensor, (input_ids, attention_mask, token_type_ids))
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be int64 [batch, seq], got shape {list(input_ids.shape)}")
        batch, seq = input_ids.shape
        with torch.inference_mode(), _torch_threads(self.num_threads):
            x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            hidden = x.shape[-1]
            x = x.reshape(batch * seq, hidden)
            mask = None
            if attention_mask is not None and not bool(attention_mask.all()):
                # HF's additive mask: 0 where attended, the dtype's minimum where masked.
                mask = ((1.0 - attention_mask.float()) * torch.finfo(torch.float32).min).contiguous()  # [B, S]
            # One workspace per calling thread (a server may call from several); the block outputs stay in
            # the embeddings' fresh tensor, so what the call returns is never a reused buffer.
            ws = self._workspaces.setdefault(threading.current_thread(), _Workspace()).start(batch * seq)
            x = x.contiguous()
            for layer in self.layers_:
                x = layer(x, batch, seq, mask, ws)
            h = x.view(batch, seq, hidden)
            if self.task_kind == "question-answering":
                start, end = self.head(h).split(1, dim=-1)
                out = QuestionAnsweringModelOutput(start_logits=start.squeeze(-1).contiguous(), end_logits=end.squeeze(-1).contiguous())
            else:
                pooled = self.pooler(h) if self.pooler is not None else None
                if self.task_kind == "text-classification":
                    out = SequenceClassifierOutput(logits=self.head(pooled))
                else:
                    out = BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)
        return out if return_dict else out.to_tuple()


def compile_model(model_or_dir: torch.nn.Module | str | Path, num_threads: int | None = None, precision: str = "fp32",
                  task: str | None = None, pattern: str = "auto", slice_structures: bool = True) -> CompiledBert:
    """Compile a BERT checkpoint for fast CPU inference (exposed as ``sparsebert.engine.compile``).

    Args:
        model_or_dir: a Hugging Face BERT model, a ``save_pretrained`` folder (task model, e.g.
            ``BertForSequenceClassification`` / ``BertForQuestionAnswering``, or ``BertModel``) or
            a deployment folder from ``sparsebert export`` (see :mod:`.loading`).
        num_threads: threads for torch ops and the kernels (``None``: torch's setting at call time).
        precision: ``"fp32"`` (output equals PyTorch's within 1e-4) or ``"int8"``.
        task: force a task kind (see :func:`.loading.load_source`).
        pattern: packing of the encoder Linear weights: ``"auto"`` (per layer, from its weight),
            ``"unstructured"``, ``"block4"``, ``"dense"`` or ``"n:m"``.
        slice_structures: first remove attention heads and FFN neurons whose output weights are all
            zero (structured pruning; :func:`sparsebert.slicing.slice_structures`): exact, smaller layers.
            ``compiled.slicing`` holds the :class:`~sparsebert.slicing.SliceReport` (``None`` when off).

    Returns:
        A :class:`CompiledBert`. A model object passed in is not modified (slicing and INT8 work on a copy).

    Raises:
        EngineError: unsupported model or precision, missing files (names the path/field).
    """
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    src = load_source(model_or_dir, task)
    from ..slicing import slice_quantization_state, sliced_copy

    model, quantization, report = src.model, src.quantization if precision == "int8" else None, None
    if quantization is not None:
        from ..export.quantize import bake_embeddings

        if src.folder is None:
            model = copy.deepcopy(model)  # never modify the caller's model
        bake_embeddings(model, quantization)
    if slice_structures:
        model, report = sliced_copy(model)  # a copy only when something is removed
        if quantization is not None and not report.empty:
            quantization = slice_quantization_state(quantization, report)
    compiled = CompiledBert(model, src.task_kind, precision, num_threads, pattern, quantization, src.folder)
    compiled.slicing = report
    if precision == "fp32" and pattern == "auto" and all(row["format"] == "dense" for row in compiled.summary()):
        # Measured (BENCHMARKS.md, "Structured L0 pruning"): on dense layers MLAS beats our torch/BLAS path.
        logger.warning("engine: every encoder Linear is dense (no unstructured/block4 sparsity to skip%s); "
                       "ONNX Runtime ran such models as fast or faster than this engine in our benchmarks (--engine onnxruntime)",
                       ", structured zeros sliced away" if report is not None and not report.empty else "")
    return compiled


class _FakeQuantLinear(torch.nn.Module):
    """``reference_int8_linear`` as a module (used by :func:`int8_reference_model`)."""

    def __init__(self, linear: torch.nn.Linear, scale: torch.Tensor | None, per_token: bool = False):
        super().__init__()
        self.linear, self.scale, self.per_token = linear, scale, per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = reference_int8_linear(x.reshape(-1, x.shape[-1]), self.linear.weight, self.linear.bias, self.scale,
                                  per_token=self.per_token)
        return y.view(*lead, -1)


_ENCODER_LINEAR = re.compile(r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                             r"intermediate\.dense|output\.dense)$")


def int8_reference_model(model: torch.nn.Module, quantization: dict[str, Any] | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose encoder Linear layers compute :func:`reference_int8_linear`
    (the INT8 engine's scheme in plain torch; QAT scales from ``quantization`` when given).

    Note: the engine quantizes query/key/value activations once (they share their input), so
    this reference matches it exactly: the three layers see the same tensor. The attention output and
    FFN2 (``*output.dense``) quantize their inputs per token, as the engine does (its fused attention
    block and FFN quantize a tile of those inputs as soon as it is computed).
    """
    ref = copy.deepcopy(model).eval()
    if quantization is not None:
        from ..export.quantize import bake_embeddings

        bake_embeddings(ref, quantization)
    qmodules = (quantization or {}).get("modules", {})
    for name, module in list(ref.named_modules()):
        if isinstance(module, torch.nn.Linear) and _ENCODER_LINEAR.match(name):
            parent, child = name.rsplit(".", 1)
            s = qmodules.get(name, {}).get("weight_scale")
            per_token = name.endswith("output.dense")  # attention output and FFN2: per-token inputs
            setattr(ref.get_submodule(parent), child,
                    _FakeQuantLinear(module, None if s is None else torch.tensor(s), per_token))
    return ref
