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

4. **SiLU·mul into an int4 down projection.** Where a gated MLP (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
   with a SiLU, gate|up fused in step 2) has a W4A16 ``down_proj`` that decodes on ``quant_triton.w4_i8mma``
   (the decode table's pick for its shape, without QuaRot's R4), the MLP hands the gate|up pair to
   ``down_proj.forward_gated``: at one row the launch that makes ``w4_i8mma``'s int8 operand computes the
   SiLU·mul from the pair, so Inductor's SiLU·mul kernel is left out (one launch fewer per layer); more rows
   compute the product in the model's own ops, as before. Checked per module on random inputs (same
   ``PROBE_TOLERANCE``); a module that computes something else keeps its own forward.

5. **SiLU·mul in the gate|up kernel, before an online R4.** Where a gated MLP (SiLU, gate|up fused in step 2)
   has a ``down_proj`` with QuaRot's online R4, and the decode kernel of the fused gate|up at one row can store
   ``silu(gate) * up`` itself (``quant_triton.glu_decode_fits``: ``wq_mm``, ``w8_mma`` or ``w4_i8mma`` with
   tiles of whole block pairs), the fused weight's rows are interleaved in ``int8_mm.GLU_BLOCK`` blocks (gate
   block, up block, ...) and the MLP computes ``down_proj(graphquant_fused.forward_glu(x))``: at decode the
   product's own epilogue writes the SiLU·mul, so the launch Inductor would run for it between the product and
   the R4 kernel is left out; at prefill the product runs as before and the SiLU·mul follows in torch ops.
   Without the R4 (step 4, or Inductor's SiLU·mul fused with the activation quantization) the launch count is
   the same either way, so this step leaves those models alone. Checked per module like step 4.

6. **Residual add + RMSNorm into the int4 gate|up's operand.** In a Llama-style decoder layer (input norm,
   attention, post-attention RMSNorm, MLP and nothing else) whose MLP's fused gate|up is W4A16 and decodes one row
   on ``quant_triton.w4_i8mma``, a one-row forward hands the attention output, the residual and the RMSNorm to the
   gate|up (``QuantLinear.forward_add_norm``, op ``graphquant::add_rms_norm_int4_linear``): one launch adds,
   normalizes and makes ``w4_i8mma``'s int8 pieces (``quant_triton.add_rms_norm_pieces``), where the model's ops
   took two (Inductor's add + RMSNorm, then the pieces); the rest of the MLP then runs from the gate|up output
   (``graphquant_from_fused``, which steps 2, 4 and 5 give the MLP). Other row counts run the layer's own
   forward. Kept only if a one-token forward of the model moves by at most ``PROBE_TOLERANCE``.

7. **Decode attention.** On CUDA the model switches to graphquant's decode attention backend
   (:mod:`graphquant.decode_attention`: the one-token decode calls read each KV head once for its
   query group instead of sdpa's ``repeat_kv`` copies; prefill and everything else stay sdpa's).
   ``attention="keep"`` leaves the model's attention as it was.

A probe forward before and after steps 2-6 (same kernels) must agree to rounding noise
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
#: ``prepare``'s step 4 (SiLU·mul into an int4 down projection); a module switch so a benchmark can A/B it
SILU_INTO_DOWN = True
#: ``prepare``'s step 5 (SiLU·mul in the gate|up kernel before an online R4); a module switch likewise
GLU_INTO_GATE_UP = True
#: ``prepare``'s step 6 (the residual add + RMSNorm into the int4 gate|up's operand launch); a module switch likewise
ADD_NORM_INTO_GATE_UP = True
#: Inductor options ``prepare`` records (report key ``decode_compile_options``) for ``StaticDecoder``'s decode step
#: compile when its caller gives none. ``combo_kernels``: the step's independent small kernels launched as one
#: (W4A16 37 -> 28 launches per profiled 2-layer step, ``benchmarks/results/decode_profile_combo_kernels.json``).
#: A/B in ``generate_gpu.py`` on one H200 (``results/generate_gpu_ab_combo_kernels_w4.json``, ``_w8.json``), decode
#: batch 1 per Llama-3-8B-shaped layer: W4A16 g128 0.0719 -> 0.0652 ms, + QuaRot 0.0771 -> 0.0710, fp8 static
#: 0.0870 -> 0.0801, fp8 dynamic 0.0917 -> 0.0853, int8 W8A8 0.0916 -> 0.0871, W8A16 0.0972 -> 0.0895. Inductor's
#: ``triton.enable_pdl`` on top of it gained nothing (W4A16 0.0660 ms). On CPU the step compiles with it and gives the
#: same tokens (tests/test_static_decode.py)
DECODE_COMPILE_OPTIONS: dict = {"combo_kernels": True}
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

    def from_fused(self, y):  # the rest of the module, given the fused projection's output (step 6)
        return cls.forward(self, y)

    return type(f"GraphquantFused{cls.__name__}", (cls,), {"forward": forward, "graphquant_from_fused": from_fused,
                                                          "__module__": cls.__module__})


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
        mod.graphquant_fused_group = group
        mod.__class__ = _fused_class(type(mod))
        fused.append(f"{name}.{'|'.join(group)}" if name else "|".join(group))
    return fused


@functools.lru_cache(maxsize=None)
def _gated_down_class(cls: type) -> type:
    """``cls`` (a gated MLP whose gate|up is fused) computing ``down_proj.forward_gated(graphquant_fused(x))``."""

    def forward(self, x=None, **kwargs):
        x = kwargs.pop("hidden_states") if x is None else x
        return self.down_proj.forward_gated(self.graphquant_fused(x))

    def from_fused(self, y):
        return self.down_proj.forward_gated(y)

    return type(f"GraphquantGatedDown{cls.__name__}", (cls,), {"forward": forward, "graphquant_from_fused": from_fused,
                                                              "__module__": cls.__module__})


def _is_silu(act, device, dtype) -> bool:
    if not callable(act):
        return False
    t = torch.linspace(-8, 8, 257, device=device, dtype=dtype)
    with torch.no_grad():
        try:
            return torch.equal(act(t), torch.nn.functional.silu(t))
        except Exception:  # noqa: BLE001 - an activation that does not take a plain tensor is not a SiLU
            return False


def _gated_down_fits(mod: nn.Module, device) -> bool:
    """A gated MLP with gate|up fused (gate first) and an int4 ``down_proj`` that decodes on ``w4_i8mma``."""
    from .kernels import int4_mm

    down, fused = getattr(mod, "down_proj", None), getattr(mod, "graphquant_fused", None)
    if getattr(mod, "graphquant_fused_group", None) != ("gate_proj", "up_proj") or not isinstance(down, QuantLinear) \
            or down.backend != "kernel" or down.kernel != "int4_linear" or down.input_rotation \
            or down.decodes_on_tinygemm(device) or fused.out_features != 2 * down.in_features \
            or (mod.gate_proj.start, mod.up_proj.start) != (0, down.in_features):
        return False
    kw = down._layout(device)
    return _is_silu(getattr(mod, "act_fn", None), device, down.dtype) and int4_mm.gated_decode_fits(
        down.out_features, down.in_features, kw.args["group_size"], kw.args["layout"], device)


def _kept_if_same(mod: nn.Module, in_features: int, dtype, device, change, undo) -> bool:
    """Apply ``change()`` to ``mod`` and keep it if ``mod``'s output on random inputs (one token; 2 x 3) moves by at
    most ``PROBE_TOLERANCE``; else ``undo()`` (also where the changed module raises). Returns whether it was kept."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape + (in_features,), generator=g).to(device=device, dtype=dtype) for shape in ((1, 1), (2, 3))]
    with torch.no_grad():
        want = [mod(x).float() for x in xs]
        change()
        try:
            got = [mod(x).float() for x in xs]
        except Exception:  # noqa: BLE001 - a module the step does not fit keeps its own forward
            got = [torch.full((1,), float("inf"))] * len(xs)
    if max(_relative_change(b, a) for a, b in zip(got, want)) <= PROBE_TOLERANCE:
        return True
    undo()
    return False


def fuse_silu_into_down(model: nn.Module, device) -> list[str]:
    """Step 4 of :func:`prepare`; returns the modules changed."""
    changed = []
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.startswith("GraphquantGatedDown") or not _gated_down_fits(mod, device):
            continue
        old_cls = type(mod)

        def change():
            mod.__class__ = _gated_down_class(old_cls)
            mod.down_proj.gated_decode = True

        def undo():  # its forward is not down_proj(silu(gate) * up)
            mod.__class__ = old_cls
            mod.down_proj.gated_decode = False

        if _kept_if_same(mod, mod.graphquant_fused.in_features, mod.down_proj.dtype, device, change, undo):
            changed.append(name)
    return changed


class _GluHalf(nn.Module):
    """The gate (``which`` 0) or up (1) half of a gate|up output interleaved in ``int8_mm.GLU_BLOCK`` blocks."""

    def __init__(self, which: int):
        super().__init__()
        self.which = which

    def forward(self, y):
        from .kernels.int8_mm import GLU_BLOCK

        return y.unflatten(-1, (-1, 2, GLU_BLOCK))[..., self.which, :].flatten(-2)

    def extra_repr(self) -> str:
        return ("gate", "up")[self.which]


@functools.lru_cache(maxsize=None)
def _glu_class(cls: type) -> type:
    """``cls`` (a gated MLP, gate|up fused and interleaved) computing ``down_proj(graphquant_fused.forward_glu(x))``."""

    def forward(self, x=None, **kwargs):
        x = kwargs.pop("hidden_states") if x is None else x
        return self.down_proj(self.graphquant_fused.forward_glu(x))

    def from_fused(self, y):  # y: the SiLU·mul (the fused op's glu=True)
        return self.down_proj(y)

    return type(f"GraphquantGlu{cls.__name__}", (cls,), {"forward": forward, "graphquant_from_fused": from_fused,
                                                        "graphquant_glu": True, "__module__": cls.__module__})


def _glu_buckets(big: QuantLinear, device) -> tuple[int, ...]:
    """The decode row buckets (``QuantLinear.GLU_BUCKETS``) at which the fused gate|up ``big`` runs on CUDA with a
    kernel that stores the SiLU·mul itself (``quant_triton.glu_decode_fits``); empty where none does."""
    from .kernels import int8_mm

    if device.type != "cuda" or big.backend != "kernel" or (qt := int8_mm.triton_kernels(device, "glu")) is None:
        return ()
    a_kind, w_kind = {"int8_linear": (qt.A_INT8, qt.W_INT8), "fp8_linear": (qt.A_FP8, qt.W_FP8),
                      "int8_weight_only": (qt.A_FLOAT, qt.W_INT8), "int4_linear": (qt.A_FLOAT, qt.W_INT4)}[big.kernel]
    group = 0
    if big.kernel == "int4_linear":
        kw = big._layout(device)
        if kw.args.get("layout") != "nibble":
            return ()
        group = kw.args["group_size"]
    if big.kernel == "int4_linear" and big.decodes_on_tinygemm(device):
        return ()  # one row runs tinygemm, which has no such epilogue
    return tuple(b for b in QuantLinear.GLU_BUCKETS
                 if qt.glu_decode_fits(b, big.out_features, big.in_features, a_kind, w_kind, group, device))


def _glu_fits(mod: nn.Module, device) -> bool:
    """A gated MLP with gate|up fused (gate first), a SiLU and a ``down_proj`` with an online R4."""
    from .kernels.int8_mm import GLU_BLOCK

    down, big = getattr(mod, "down_proj", None), getattr(mod, "graphquant_fused", None)
    if getattr(mod, "graphquant_fused_group", None) != ("gate_proj", "up_proj") or not isinstance(down, QuantLinear) \
            or not isinstance(big, QuantLinear) or not down.input_rotation \
            or big.out_features != 2 * down.in_features or down.in_features % GLU_BLOCK \
            or (mod.gate_proj.start, mod.up_proj.start) != (0, down.in_features):
        return False
    return _is_silu(getattr(mod, "act_fn", None), device, down.dtype) and 1 in _glu_buckets(big, device)


def _interleaved(rec: LinearRecord, half: int) -> LinearRecord:
    """``rec`` (a fused gate|up of ``2 half`` rows) with its rows interleaved in ``int8_mm.GLU_BLOCK`` blocks."""
    from .kernels.int8_mm import GLU_BLOCK

    rows = torch.arange(2 * half).view(2, half // GLU_BLOCK, GLU_BLOCK).transpose(0, 1).reshape(-1)

    def take(t):
        if t is None or t.dim() == 0 or t.shape[0] != 2 * half:
            return t  # one scale for every row
        return t.index_select(0, rows.to(t.device))

    return dataclasses.replace(rec, weight=take(rec.weight), weight_scale=take(rec.weight_scale),
                               weight_zero_point=take(rec.weight_zero_point), bias=take(rec.bias))


def glu_into_gate_up(model: nn.Module, device) -> list[str]:
    """Step 5 of :func:`prepare`; returns the modules changed."""
    changed = []
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.startswith("GraphquantGlu") or not _glu_fits(mod, device):
            continue
        big, half = mod.graphquant_fused, mod.down_proj.in_features
        new = QuantLinear(_interleaved(big.record(), half), big.backend)
        new.prepare_kernels(device)
        new.glu_buckets = _glu_buckets(new, device)
        old = (type(mod), big, mod.gate_proj, mod.up_proj)

        def change():
            mod.graphquant_fused, mod.gate_proj, mod.up_proj = new, _GluHalf(0), _GluHalf(1)
            mod.__class__ = _glu_class(old[0])

        def undo():  # its forward is not down_proj(silu(gate) * up)
            mod.__class__, mod.graphquant_fused, mod.gate_proj, mod.up_proj = old

        if _kept_if_same(mod, big.in_features, big.dtype, device, change, undo):
            changed.append(name)
    return changed


#: the children of a decoder layer whose forward step 6 knows (Llama's: Mistral, Qwen2 and Qwen3 have the same)
_ADD_NORM_LAYER_CHILDREN = frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"})
#: the keyword arguments a Hugging Face decoder layer passes its attention with these defaults
_LAYER_DEFAULTS = {"attention_mask": None, "position_ids": None, "past_key_values": None, "use_cache": False,
                   "position_embeddings": None}


def _rms_eps(norm: nn.Module):
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _is_rms_norm(norm: nn.Module, eps: float, width: int, device, dtype) -> bool:
    """Whether ``norm`` computes Hugging Face's (Llama's) RMSNorm with its ``weight`` and ``eps``
    (``int4_mm.rms_norm``), bit for bit on random rows."""
    from .kernels import int4_mm

    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (width,) or w.dtype != dtype:
        return False
    x = torch.randn((3, width), generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            return torch.equal(norm(x), int4_mm.rms_norm(x, w, eps))
        except Exception:  # noqa: BLE001 - a norm that does not take a plain tensor is not one
            return False


def _add_norm_fits(layer: nn.Module, device) -> bool:
    """A Llama-style decoder layer (exactly :data:`_ADD_NORM_LAYER_CHILDREN`) whose MLP starts with a fused gate|up
    (step 2) on a W4A16 kernel without an online rotation, that decodes one row on ``w4_i8mma``
    (``int4_mm.add_norm_decode_fits``), after a Hugging Face RMSNorm."""
    from .kernels import int4_mm

    if {n for n, _ in layer.named_children()} != _ADD_NORM_LAYER_CHILDREN:
        return False
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    big = getattr(mlp, "graphquant_fused", None)
    if getattr(mlp, "graphquant_fused_group", None) != ("gate_proj", "up_proj") or not isinstance(big, QuantLinear) \
            or not hasattr(type(mlp), "graphquant_from_fused") or big.backend != "kernel" \
            or big.kernel != "int4_linear" or big.input_rotation or big.input_quantizer is not None \
            or big.decodes_on_tinygemm(device) or (eps := _rms_eps(norm)) is None:
        return False
    kw = big._layout(device)
    return int4_mm.add_norm_decode_fits(big.out_features, big.in_features, kw.args["group_size"],
                                        kw.args["layout"], device) \
        and _is_rms_norm(norm, eps, big.in_features, device, big.dtype)


@functools.lru_cache(maxsize=None)
def _add_norm_layer_class(cls: type) -> type:
    """``cls`` (a Llama-style decoder layer) whose one-row forward hands the attention output, the residual and the
    post-attention RMSNorm to the MLP's fused gate|up (``QuantLinear.forward_add_norm``) and the gate|up output to
    the rest of the MLP (``graphquant_from_fused``); other row counts run ``cls``'s forward."""

    def forward(self, hidden_states, *args, **kwargs):
        if args or hidden_states[..., 0].numel() != 1:
            return cls.forward(self, hidden_states, *args, **kwargs)
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **{**_LAYER_DEFAULTS, **kwargs})
        mlp, norm = self.mlp, self.post_attention_layernorm
        s, y = mlp.graphquant_fused.forward_add_norm(h, residual, norm, _rms_eps(norm),
                                                     glu=getattr(mlp, "graphquant_glu", False))
        return s + mlp.graphquant_from_fused(y)

    return type(f"GraphquantAddNorm{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})


def _probe_one_token(model: nn.Module, device) -> torch.Tensor:
    """Logits of one token (one row through every layer: the decode shape)."""
    ids = torch.tensor([[min(5, int(model.config.vocab_size) - 1)]], device=device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def add_norm_into_gate_up(model: nn.Module, device) -> list[str]:
    """Step 6 of :func:`prepare`; returns the layers changed (all that fit, or none where a one-token probe of
    the model moves by more than ``PROBE_TOLERANCE`` or raises)."""
    layers = [(name, mod) for name, mod in model.named_modules()
              if not type(mod).__name__.startswith("GraphquantAddNorm") and _add_norm_fits(mod, device)]
    if not layers:
        return []
    try:
        before = _probe_one_token(model, device)
    except Exception:  # noqa: BLE001 - a model that cannot run one token alone: nothing to compare against
        return []
    for _, mod in layers:
        mod.__class__ = _add_norm_layer_class(type(mod))
    try:
        kept = _relative_change(before, _probe_one_token(model, device)) <= PROBE_TOLERANCE
    except Exception:  # noqa: BLE001 - a layer whose forward is not the one this step knows
        kept = False
    if not kept:
        for _, mod in layers:
            mod.__class__ = type(mod).__mro__[1]
        return []
    return [name for name, _ in layers]


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
def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """Largest change relative to ``before``'s largest magnitude (what ``PROBE_TOLERANCE`` bounds); inf where the
    shapes differ."""
    if after.shape != before.shape:
        return float("inf")
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))


def _probe(model: nn.Module, device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise PrepareError("the model's config has no vocab_size; prepare() probes the model with token ids")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=g).to(device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def prepare(model: nn.Module, fuse: bool = True, r3: str = "elide", check: bool = True,
            attention: str = "decode", silu_into_down: bool | None = None,
            glu_into_up: bool | None = None, add_norm_into_up: bool | None = None) -> nn.Module:
    """Ready a written-back graphquant model for fast generation (see the module docstring); returns
    it (changed in place). ``fuse``: horizontal fusion of q|k|v and gate|up; ``r3``: "elide" (drop R3
    where it feeds no K quantizer) or "keep"; ``check``: compare a probe forward before and after;
    ``attention``: "decode" (graphquant's decode attention backend, on CUDA) or "keep"; ``silu_into_down``
    (default ``SILU_INTO_DOWN``): step 4, on the fused gate|up (so only with ``fuse``); ``glu_into_up`` (default
    ``GLU_INTO_GATE_UP``): step 5, likewise; ``add_norm_into_up`` (default ``ADD_NORM_INTO_GATE_UP``): step 6,
    likewise."""
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
    if fuse and (SILU_INTO_DOWN if silu_into_down is None else silu_into_down):
        report["silu_into_down"] = fuse_silu_into_down(model, device)
    if fuse and (GLU_INTO_GATE_UP if glu_into_up is None else glu_into_up):
        report["glu_into_gate_up"] = glu_into_gate_up(model, device)
    if fuse and (ADD_NORM_INTO_GATE_UP if add_norm_into_up is None else add_norm_into_up):
        report["add_norm_into_gate_up"] = add_norm_into_gate_up(model, device)
    if check:
        after = _probe(model, device)
        err = _relative_change(before, after)
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
    report["decode_compile_options"] = dict(DECODE_COMPILE_OPTIONS)
    model.__dict__[PREPARED_ATTR] = report
    return model
