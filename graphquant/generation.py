"""Fast generation with a quantized Hugging Face model: :func:`prepare`.

``prepare(model)`` takes the HF write-back of a graphquant model (``QuantizedModel.to_hf()`` or
``graphquant.load``) on its device and readies it for KV-cached decoding under ``torch.compile`` and
CUDA graphs (``graphquant.static_decode.StaticDecoder``, or HF ``generate`` with a static cache):

1. **Kernels, built up front.** Every ``QuantLinear`` with a kernel runs it (``kernels="always"``
   on CUDA; on CPU the measured choice of ``qlinear.choose_backend``), with its weight layout built
   now, on the model's device, so a compiled or graph-captured forward only reads buffers. int4
   weights on CUDA also get torch's own tinygemm layout, which decode (M <= 4) uses, wherever the
   decode table (``quant_triton.decode_choice``) measured it faster than graphquant's kernels: on the
   H200 that is every Llama-3-8B shape (``benchmarks/results/decode_kernels_packed.json``); prefill keeps
   graphquant's nibble layout (dequantize + cuBLAS). The fake-quant codes that no kernel reads are freed.
2. **Horizontal fusion.** Sibling projections that read the same input through the same input
   quantizer and rotation (``q_proj|k_proj|v_proj``, ``gate_proj|up_proj``) become one
   ``QuantLinear`` over their concatenated weights: one activation quantization and one weight
   stream instead of three. The parent module then receives the fused output and its projections
   become slices of it (a subclass whose ``forward`` feeds the fused output; the parent's own code
   is unchanged), so any architecture whose projections read the module input works.
3. **R3 elision.** QuaRot's R3 rotates Q and K by the same orthogonal ``H`` along ``head_dim``; the
   attention scores ``(qH)·(kH) = q·k`` do not change. It only matters for a quantized K cache,
   so where no K quantizer follows it, it is dropped.

4. **Decode attention.** On CUDA the model switches to graphquant's decode attention backend
   (:mod:`graphquant.decode_attention`: the one-token decode calls read each KV head once for its
   query group instead of sdpa's ``repeat_kv`` copies; prefill and everything else stay sdpa's).
   ``attention="keep"`` leaves the model's attention as it was.

A probe forward before and after steps 2-3 (same kernels) must agree to rounding noise
(``PROBE_TOLERANCE``), else :class:`PrepareError` says so; the model is then left half-prepared:
build it again and call ``prepare(model, fuse=False, r3="keep")``. The prepared model is for
generation only: saving it raises (save before preparing).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from .errors import GraphQuantError
from .export import attention as A
from .export.qlinear import QuantLinear
from .export.records import LinearRecord, TensorQuantizer

#: sibling projections fused into one QuantLinear (child names of one parent module)
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PREPARED_ATTR = "graphquant_prepared"
#: relative logit change ``prepare`` accepts. Fusion and R3 elision change only rounding (kernel tiles, the bf16
#: rounding of rotated Q and K), but a later activation quantizer can move a value across a code boundary, and
#: that difference then travels to the logits: 3.7% on the int8 W8A8 + QuaRot Llama-3-8B-shaped 2-layer random
#: model in bf16 on the H200 (the same order as lowered vs fake-quant, tests/test_lowering_gpu.py). A structural
#: mistake (a slice of the wrong projection) changes them by O(1) (tests/test_generation_prepare.py).
PROBE_TOLERANCE = 0.1


class PrepareError(GraphQuantError, RuntimeError):
    """``prepare`` was given a model without graphquant Linears, or could not keep its function."""


class _Slice(nn.Module):
    """A fused projection's share: ``x[..., start:stop]``."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return x[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"[{self.start}:{self.stop}] of graphquant_fused"


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    """``cls`` whose forward first runs ``graphquant_fused`` on its input (``hidden_states``)."""

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self.graphquant_fused(kwargs["hidden_states"])
        else:
            args = (self.graphquant_fused(args[0]),) + tuple(args[1:])
        return cls.forward(self, *args, **kwargs)

    return type(f"GraphquantFused{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})


# ----------------------------------------------------------------------------------- fusion
def _same_quantizer(a: TensorQuantizer | None, b: TensorQuantizer | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.spec.to_op_str() != b.spec.to_op_str() or (a.sink_tokens, a.sink_mode) != (b.sink_tokens, b.sink_mode):
        return False
    for x, y in ((a.scale, b.scale), (a.zero_point, b.zero_point)):
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def fuse_records(recs: list[LinearRecord]) -> LinearRecord | None:
    """One record computing ``cat([r(x) for r in recs], -1)``, or None if they cannot share one kernel
    (different weight schemes, input quantizers, rotations, dtypes, or output quantizers)."""
    first = recs[0]
    spec = first.weight_spec
    if any(r.weight_spec != spec or r.dtype != first.dtype or r.input_rotation != first.input_rotation
           or r.output is not None or not _same_quantizer(r.input, first.input)
           or r.shape[1] != first.shape[1] for r in recs):
        return None
    qs = spec.qscheme.value
    if qs not in ("per_tensor", "per_channel", "per_group"):
        return None
    scales, zps = [r.weight_scale for r in recs], [r.weight_zero_point for r in recs]
    # one weight spec: every member stores a zero point, or none does
    if qs == "per_tensor":
        if all(torch.equal(s, scales[0]) for s in scales) and all(z is None or torch.equal(z, zps[0]) for z in zps):
            scale, zp = scales[0], zps[0]
        else:  # one scale per projection -> one per output channel, the same numbers
            spec = spec.evolve(qscheme="per_channel", ch_axis=0)
            scale = torch.cat([s.reshape(1).expand(r.shape[0]) for s, r in zip(scales, recs)])
            zp = None if zps[0] is None else torch.cat([z.reshape(1).expand(r.shape[0]) for z, r in zip(zps, recs)])
    else:
        if qs == "per_channel" and spec.ch_axis not in (0, None):
            return None
        scale = torch.cat([s.reshape(r.shape[0], -1) for s, r in zip(scales, recs)]).reshape(
            (-1,) if qs == "per_channel" else (sum(r.shape[0] for r in recs), -1))
        zp = None if zps[0] is None else torch.cat([z.reshape(r.shape[0], -1) for z, r in zip(zps, recs)]).reshape(
            scale.shape)
    bias = None
    if any(r.bias is not None for r in recs):
        bias = torch.cat([r.bias if r.bias is not None else torch.zeros(r.shape[0], dtype=first.dtype,
                                                                          device=first.weight.device) for r in recs])
    return dataclasses.replace(first, weight=torch.cat([r.weight for r in recs]), weight_spec=spec,
                               weight_scale=scale, weight_zero_point=zp, bias=bias)


def _fusable_groups(model: nn.Module):
    for name, mod in model.named_modules():
        for group in FUSE_GROUPS:
            members = [getattr(mod, child, None) for child in group]
            if all(isinstance(m, QuantLinear) for m in members) and not hasattr(mod, "graphquant_fused"):
                yield name, mod, group, members


def fuse_projections(model: nn.Module, device) -> list[str]:
    """Step 2 of :func:`prepare`; returns the fused groups' names."""
    fused = []
    for name, mod, group, members in list(_fusable_groups(model)):
        backend = members[0].backend
        rec = fuse_records([m.record() for m in members]) if all(m.backend == backend for m in members) else None
        if rec is None:
            continue
        big = QuantLinear(rec, backend)
        big.prepare_kernels(device)
        start = 0
        for child, m in zip(group, members):
            setattr(mod, child, _Slice(start, start + m.out_features))
            start += m.out_features
        mod.graphquant_fused = big
        mod.__class__ = _fused_class(type(mod))
        fused.append(f"{name}.{'|'.join(group)}" if name else "|".join(group))
    return fused


def elide_r3(model: nn.Module) -> list[str]:
    """Step 3 of :func:`prepare`: drop R3 where no K quantizer follows it; returns the modules changed."""
    changed = []
    for name, mod in model.named_modules():
        online = getattr(mod, A.ONLINE_ATTR, None)
        if isinstance(online, A.OnlineAttention) and online.r3 and online.k_quantizer is None:
            online.r3 = None
            changed.append(name)
            if online.v_quantizer is None:
                delattr(mod, A.ONLINE_ATTR)
    return changed


# ----------------------------------------------------------------------------------- prepare
def _probe(model: nn.Module, device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise PrepareError("the model's config has no vocab_size; prepare() probes the model with token ids")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=g).to(device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def prepare(model: nn.Module, fuse: bool = True, r3: str = "elide", check: bool = True,
            attention: str = "decode") -> nn.Module:
    """Ready a written-back graphquant model for fast generation (see the module docstring); returns
    it (changed in place). ``fuse``: horizontal fusion of q|k|v and gate|up; ``r3``: "elide" (drop R3
    where it feeds no K quantizer) or "keep"; ``check``: compare a probe forward before and after;
    ``attention``: "decode" (graphquant's decode attention backend, on CUDA) or "keep"."""
    if r3 not in ("elide", "keep"):
        raise ValueError(f"r3={r3!r}: choose 'elide' or 'keep'")
    if attention not in ("decode", "keep"):
        raise ValueError(f"attention={attention!r}: choose 'decode' or 'keep'")
    if getattr(model, PREPARED_ATTR, None):
        return model
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not qlinears:
        raise PrepareError("no graphquant QuantLinear in this model: prepare() takes QuantizedModel.to_hf() or "
                           "graphquant.load(...) output")
    device = next(iter(model.buffers())).device
    model.eval()
    for m in qlinears:
        if m.kernel is not None and device.type == "cuda":
            m.backend = "kernel"
        m.prepare_kernels(device)
    before = _probe(model, device) if check else None
    report = {"fused": fuse_projections(model, device) if fuse else [],
              "r3_elided": elide_r3(model) if r3 == "elide" else []}
    if check:
        after = _probe(model, device)
        err = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
        report["probe_rel_err"] = err
        if not err <= PROBE_TOLERANCE:
            raise PrepareError(f"prepare() changed the model's logits by {err:.3g} (relative, > {PROBE_TOLERANCE}) "
                               f"after fusing {report['fused'][:3]} / eliding R3 in {len(report['r3_elided'])} "
                               "modules; build the model again and call prepare(model, fuse=False, r3='keep')")
    if device.type == "cuda":
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.drop_codes(device)
        if attention == "decode":
            from . import decode_attention

            decode_attention.use_if_sdpa(model)
    report["attention"] = getattr(model.config, "_attn_implementation", None)
    model.__dict__[PREPARED_ATTR] = report
    return model
