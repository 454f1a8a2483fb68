"""``QuantLinear``: the Linear layer of a written-back Hugging Face model.

It holds the real quantized weight (codes in int8 / uint8 / float8 storage, scales, zero points
only where the scheme has them) and computes exactly what the compiled graph computes at that
Linear::

    x -> [online R4: x·Hᵀ] -> [input quantizer] -> linear(x, dequantize(W), b) -> [output quantizer]

with the same ``graphquant::`` ops, so its output is bit-identical to the graph's on the same
device (``backend="fake_quant"``). ``backend="kernel"`` runs the low-precision kernels
``graphquant.lowering`` uses (``int8_linear``, ``fp8_linear``, ``int8_weight_only_linear``,
``int4_linear``) where ``lowering.schemes.choose`` finds one, with the weight in the kernel's layout
(built per device on first use); results then differ from fake-quant by the kernels' accumulation
order only. ``choose_backend`` picks per scheme and device (see ``CPU_FASTER``).

``WeightlessRMSNorm`` replaces a LayerNorm that norm fusion turned into a plain RMS normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import int8_mm as _int8_mm
from ..quant import fake_quant as FQ
from .records import LinearRecord, TensorQuantizer

#: On CPU, which kernels beat fake-quant (dequantize + float matmul) at decode shapes (M = 1), measured by
#: ``benchmarks/generate_cpu.py --per_op_only`` on gq-llama-20m's q_proj / down_proj / lm_head (1 thread, fastest
#: of 200 calls; results/generate_cpu_per_op.json): int8_linear (torch._int_mm) 79-534 us vs fake-quant
#: 155-2261 us; int8 weight-only (_weight_int8pack_mm) 100-1804 us vs 107-2090 us; int4 (CPU tinygemm)
#: 231-4794 us vs 123-2146 us; fp8 (_scaled_mm on CPU) 11-245 ms vs 0.7-30 ms.
CPU_FASTER = {"int8_linear": True, "int8_weight_only": True, "int4_linear": False, "fp8_linear": False}
#: at most this many rows run torch's tinygemm int4 kernel on CUDA (when ``prepare_kernels`` built its layout)
TINYGEMM_MAX_M = 4


def _tinygemm_decodes(N: int, K: int, group: int, device: torch.device) -> bool:
    """Whether int4 decode (M = 1) of an (N, K) weight on ``device`` runs torch's tinygemm: where
    ``quant_triton.decode_choice`` (the H200 sweep's table) says it beats graphquant's kernels, or where
    Triton cannot run."""
    from ..kernels import int8_mm

    qt = int8_mm.triton_kernels(device, "decode_mm")
    if qt is None:
        return True
    choice = qt.decode_choice(1, N, K, qt.A_FLOAT, qt.W_INT4, group, device)
    return choice is not None and choice[0] == "tinygemm"


def _ops():
    from ..quant import ops  # noqa: F401  registers graphquant::* ops

    return torch.ops.graphquant


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    from .. import hadamard  # noqa: F401  registers graphquant::hadamard_transform

    return torch.ops.graphquant.hadamard_transform(x, False)


def kernel_for(rec: LinearRecord) -> str | None:
    """The lowering kernel for this Linear's scheme, or None."""
    from ..lowering import schemes

    act = rec.input.spec if rec.input is not None else None
    if rec.output is not None or (rec.input is not None and rec.input.sink_tokens):
        return None  # no kernel quantizes the sink tokens per token (see passes/sink_tokens.py)
    return schemes.choose(rec.weight_spec, act, rec.shape[1], rec.dtype).kernel


def choose_backend(rec: LinearRecord, kernels: str = "auto", device: str = "cpu") -> str:
    """``"fake_quant"`` or ``"kernel"``: ``kernels`` is "auto" (the faster one for this scheme on
    ``device``), "always" (the kernel wherever one exists) or "never"."""
    if kernels not in ("auto", "always", "never"):
        raise ValueError(f"kernels={kernels!r}: choose 'auto', 'always' or 'never'")
    k = kernel_for(rec)
    if k is None or kernels == "never":
        return "fake_quant"
    if kernels == "always" or torch.device(device).type != "cpu":
        return "kernel"
    return "kernel" if CPU_FASTER.get(k, False) else "fake_quant"


class _Quantizer(nn.Module):
    def __init__(self, q: TensorQuantizer):
        super().__init__()
        self.spec = q.spec.to_op_str()
        self.dynamic = q.dynamic
        self.sink_tokens, self.sink_mode = q.sink_tokens, q.sink_mode
        if not q.dynamic:
            self.register_buffer("scale", q.scale.detach().clone())
            zp = q.zero_point if q.zero_point is not None else torch.zeros((), dtype=torch.int32)
            self.register_buffer("zero_point", zp.detach().clone(), persistent=q.zero_point is not None)

    def forward(self, x):
        if self.dynamic:
            return _ops().dynamic_fake_quant(x, self.spec)
        if self.sink_tokens and x.dim() >= 2 and x.shape[-2] > 1:
            # a prefill (several positions, from position 0): the first tokens as the graph does them. A
            # decode step (one new position, past the sink) uses the static scale, as the graph would there.
            from ..passes import sink_tokens  # noqa: F401  registers graphquant::fake_quant_prefix

            return _ops().fake_quant_prefix(x, self.scale, self.zero_point, self.spec, self.sink_tokens, x.dim() - 2,
                                            self.sink_mode)
        return _ops().fake_quant(x, self.scale, self.zero_point, self.spec)

    def record(self) -> TensorQuantizer:
        spec = FQ.as_spec(self.spec)
        if self.dynamic:
            return TensorQuantizer(spec)
        return TensorQuantizer(spec, self.scale, self.zero_point if FQ._uses_zero_point(spec) else None,
                               self.sink_tokens, self.sink_mode)

    def extra_repr(self) -> str:
        sink = f", first {self.sink_tokens} token(s) {self.sink_mode}" if self.sink_tokens else ""
        return f"{self.spec}{' dynamic' if self.dynamic else ''}{sink}"


def _tinygemm_key(device) -> tuple:
    """``QuantLinear._layouts``' key of torch's tinygemm layout for int4 decode on ``device``."""
    return ("tinygemm", str(torch.device(device)))


class QuantLinear(nn.Module):
    """A quantized ``nn.Linear`` (see the module docstring). Build it with :meth:`from_record`."""

    def __init__(self, rec: LinearRecord, backend: str = "fake_quant"):
        super().__init__()
        self.out_features, self.in_features = rec.shape
        self.weight_spec = rec.weight_spec.to_op_str()
        self.dtype = rec.dtype
        self.input_rotation = rec.input_rotation
        self.register_buffer("weight", rec.weight.detach().clone())
        self.register_buffer("weight_scale", rec.weight_scale.detach().float().clone())
        zp = rec.weight_zero_point
        self.register_buffer("weight_zero_point", (zp if zp is not None else torch.zeros((), dtype=torch.int32)).clone(),
                             persistent=zp is not None)
        self.bias = nn.Parameter(rec.bias.detach().clone(), requires_grad=False) if rec.bias is not None else None
        self.input_quantizer = _Quantizer(rec.input) if rec.input is not None else None
        self.output_quantizer = _Quantizer(rec.output) if rec.output is not None else None
        self.kernel = kernel_for(rec)
        self.backend = backend if self.kernel is not None else "fake_quant"
        self._layouts: dict = {}

    @classmethod
    def from_record(cls, rec: LinearRecord, kernels: str = "never", device: str = "cpu") -> "QuantLinear":
        return cls(rec, choose_backend(rec, kernels, device))

    def record(self) -> LinearRecord:
        """This layer as a :class:`LinearRecord` (what the checkpoint writers read)."""
        if getattr(self, "kernels_only", False):
            from .from_graph import ExportError

            raise ExportError("this model was prepared for generation (graphquant.generation.prepare) and keeps only "
                              "its kernel weights; save the model before preparing it")
        spec = FQ.as_spec(self.weight_spec)
        return LinearRecord(self.weight, spec, self.weight_scale,
                            self.weight_zero_point if FQ._uses_zero_point(spec) else None,
                            self.bias.detach() if self.bias is not None else None, self.dtype,
                            self.input_quantizer.record() if self.input_quantizer is not None else None,
                            self.output_quantizer.record() if self.output_quantizer is not None else None,
                            self.input_rotation)

    def dequantized_weight(self) -> torch.Tensor:
        return _ops().dequantize(self.weight, self.weight_scale, self.weight_zero_point, self.weight_spec, self.dtype)

    #: set by ``generation.prepare`` where a gated MLP hands this (down) projection its gate|up pair at one row
    #: (:meth:`forward_gated`): the int4 kernel then makes its operand from the pair
    gated_decode = False

    def forward_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``self(silu(gate) * up)`` for ``gate_up = [gate | up]`` along the last dim (a gated MLP's down projection).
        With :attr:`gated_decode`, at one row, the kernel computes the SiLU·mul itself
        (``graphquant::int4_linear(..., gated=True)``); otherwise the product first, in the model's own ops."""
        if self.gated_decode and self.backend == "kernel" and gate_up[..., 0].numel() == 1:
            return self._int4_linear(gate_up, gated=True)
        gate, up = gate_up.chunk(2, dim=-1)
        return self(F.silu(gate) * up)

    #: decode row buckets (``int8_mm.M_BUCKETS`` up to 16 rows: 1, up to 4, up to 16) and, set by
    #: ``generation.prepare`` on a fused gate|up, those at which its decode kernel stores the SiLU·mul itself
    #: (:meth:`forward_glu`)
    GLU_BUCKETS = tuple(b for b in _int8_mm.M_BUCKETS if b <= 16)
    glu_buckets: tuple = ()

    def forward_glu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of this projection's output, for a fused gate|up projection whose rows
        ``generation.prepare`` interleaved in ``int8_mm.GLU_BLOCK`` blocks (``int8_mm.interleaved_glu``). At the
        row counts of :attr:`glu_buckets` the linear op's ``glu=True`` lets the decode kernel compute it in its
        epilogue (no SiLU·mul launch); otherwise the product, then the SiLU·mul in the model's own ops (which
        Inductor fuses into one kernel)."""
        from ..kernels.int8_mm import interleaved_glu

        rows = x[..., 0].numel()
        if self.backend == "kernel" and rows <= self.GLU_BUCKETS[-1] and _int8_mm.m_bucket(rows) in self.glu_buckets:
            return self._forward_kernel(x, glu=True)
        return interleaved_glu(self(x))

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, eps: float,
                         glu: bool = False):
        """``(s, self(norm(s)))`` with ``s = x + residual`` and ``norm`` a Hugging Face RMSNorm (weight ``norm.weight``,
        epsilon ``eps``) for this W4A16 projection on its kernel (``glu``: :meth:`forward_glu`'s SiLU·mul): one op,
        ``graphquant::add_rms_norm_int4_linear``, whose decode path makes the product's operand in the launch that
        adds and normalizes (``generation.prepare``'s residual add + RMSNorm into the gate|up)."""
        from ..lowering import ops as _lops  # noqa: F401  registers the kernel ops

        kw = self._layout(x.device)
        t = kw.tensors
        return torch.ops.graphquant.add_rms_norm_int4_linear(x, residual, norm.weight, float(eps), t["qweight"],
                                                             t["qscale"], t.get("qzeros"), self.bias,
                                                             kw.args["group_size"], kw.args["layout"], glu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "kernel":
            return self._forward_kernel(x)
        if self.input_rotation:
            x = _hadamard(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.linear(x, self.dequantized_weight(), self.bias)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    # ------------------------------------------------------------------ kernels
    def _layout(self, device: torch.device):
        from ..lowering import layouts

        key = (str(device), x_dtype := self.dtype)
        if key not in self._layouts:
            spec = FQ.as_spec(self.weight_spec)
            if self.kernel in ("int8_linear", "int8_weight_only"):
                kw = layouts.int8_weight(self.weight, self.weight_scale)
            elif self.kernel == "fp8_linear":
                kw = layouts.fp8_weight(self.weight, self.weight_scale)
            else:
                kw = layouts.int4_weight(self.weight, self.weight_scale, self.weight_zero_point, spec, x_dtype)
            self._layouts[key] = kw
        return self._layouts[key]

    def prepare_kernels(self, device) -> None:
        """Build the kernel layout on ``device`` now (not on the first call, which a compiled or
        CUDA-graphed forward must not do), plus torch's tinygemm layout for int4 decode on CUDA."""
        device = torch.device(device)
        if self.backend != "kernel":
            return
        kw = self._layout(device)
        key = _tinygemm_key(device)
        if self.kernel == "int4_linear" and kw.args.get("layout") == "nibble" and key not in self._layouts \
                and _tinygemm_decodes(self.out_features, self.in_features, kw.args["group_size"], device):
            from ..lowering import layouts

            tg = layouts.int4_tinygemm_cuda(kw.tensors["qweight"], kw.tensors["qscale"], kw.tensors.get("qzeros"),
                                            kw.args["group_size"], self.dtype)
            if tg is not None:
                self._layouts[key] = tg

    def _tinygemm_layout(self, device):
        """The tinygemm layout built for ``device`` (int4 decode on CUDA), or None."""
        return self._layouts.get(_tinygemm_key(device))

    def decodes_on_tinygemm(self, device) -> bool:
        """Whether decode (M <= ``TINYGEMM_MAX_M``) on ``device`` runs torch's tinygemm (its layout was built)."""
        return self._tinygemm_layout(device) is not None

    def _int4_linear(self, x: torch.Tensor, gated: bool = False, glu: bool = False) -> torch.Tensor:
        """``graphquant::int4_linear`` on this module's layout for ``x``'s device; the online R4 inside the op (at
        decode it may make the int4 kernel's operand itself, int4_mm), ``gated``: ``x`` is a gate|up pair,
        ``glu``: :meth:`forward_glu`."""
        from ..lowering import ops as _lops  # noqa: F401  registers the kernel ops

        kw = self._layout(x.device)
        t = kw.tensors
        return torch.ops.graphquant.int4_linear(x, t["qweight"], t["qscale"], t.get("qzeros"), self.bias,
                                                kw.args["group_size"], kw.args["layout"], bool(self.input_rotation),
                                                gated, glu)

    def drop_codes(self, device) -> None:
        """Free the fake-quant codes where the kernel layout on ``device`` does not share them: the module
        then runs only its kernels and can no longer be saved."""
        if self.backend != "kernel":
            return
        kw = self._layout(torch.device(device))
        if all(t.data_ptr() != self.weight.data_ptr() for t in kw.tensors.values()):
            self.weight = torch.empty((0,), dtype=self.weight.dtype, device=device)
            self.kernels_only = True

    def _forward_kernel(self, x: torch.Tensor, glu: bool = False) -> torch.Tensor:
        from ..lowering import activation
        from ..lowering import ops as _lops  # noqa: F401  registers the kernel ops

        if self.kernel == "int4_linear":
            tg = self._tinygemm_layout(x.device)
            if tg is not None and x.dtype == torch.bfloat16 and x[..., 0].numel() <= TINYGEMM_MAX_M:
                # decode: torch's own int4 kernel (tinygemm), measured fastest at M = 1 on the H200
                # (benchmarks/results/decode_kernels.json); prefill keeps the nibble layout
                x = _hadamard(x) if self.input_rotation else x
                out = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), tg.tensors["tg_weight"],
                                                         tg.args["group_size"], tg.tensors["tg_scale_zeros"])
                out = out.reshape(*x.shape[:-1], self.out_features)
                out = out + self.bias if self.bias is not None else out
                if glu:
                    from ..kernels.int8_mm import interleaved_glu

                    return interleaved_glu(out)
                return out
            return self._int4_linear(x, glu=glu)
        ops = torch.ops.graphquant
        t = self._layout(x.device).tensors
        if self.kernel == "int8_weight_only":
            x = _hadamard(x) if self.input_rotation else x
            return ops.int8_weight_only_linear(x, t["qweight"], t["qscale"], self.bias, glu)
        q = self.input_quantizer
        if q.dynamic:
            xq, xs = activation.quantize_act_dynamic_node(x, q.spec, bool(self.input_rotation))
        else:
            xs = q.scale
            xq = activation.quantize_act_static_node(x, q.scale, q.spec, bool(self.input_rotation))
        op = ops.int8_linear if self.kernel == "int8_linear" else ops.fp8_linear
        return op(xq, xs, t["qweight"], t["qscale"], self.bias, self.dtype, glu)

    def extra_repr(self) -> str:
        extra = f", input_rotation={self.input_rotation}" if self.input_rotation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight_spec}, "
                f"backend={self.backend}{'/' + self.kernel if self.backend == 'kernel' else ''}{extra}")


class WeightlessRMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps)`` with no weight: a LayerNorm after norm fusion and centering."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return torch.ops.aten.rms_norm(x, [x.shape[-1]], None, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
