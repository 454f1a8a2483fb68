"""Lowering Q/DQ graphs to real kernels on CPU: numerics vs fake-quant, fallbacks, compile, memory.

CPU runs the same ops as CUDA through torch's CPU kernels (``torch._int_mm``, ``torch._scaled_mm``,
``aten._weight_int4pack_mm_for_cpu``, ``aten._weight_int8pack_mm``), so in float32 every lowered
Linear matches its fake-quant twin up to float rounding. That is checked Linear by Linear with
teacher forcing (each lowered op sees exactly the input the fake-quant Linear saw). End to end, a
~1e-7 difference can move one activation across a rounding boundary of a later quantizer (one code
step, ~1/127 of that token's range), so logits are compared at 1e-2 where activations are
quantized and at 1e-4 for weight-only schemes.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch

import graphquant as gq
from graphquant.config import Config, QuantizationConfig, QuantizationSpec, preset
from graphquant.calibrate import probes
from graphquant.lowering import LOWERED_TAG, choose, find_sites, lower_model
from graphquant.models.tiny import tiny_model

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _grouped(name: str, group: int) -> Config:
    cfg = preset(name)
    qc = cfg.global_quant_config
    weight = qc.weight.evolve(group_size=group)
    return dataclasses.replace(cfg, global_quant_config=dataclasses.replace(qc, weight=weight))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


class _TeacherForced(torch.fx.Interpreter):
    """Runs a lowered graph, replacing each lowered Linear's output by the fake-quant one (so every
    kernel sees the fake-quant run's inputs) and recording the kernel's relative error."""

    def __init__(self, gm, fake_outputs: dict):
        super().__init__(gm)
        self.fake_outputs, self.errors = fake_outputs, {}

    def run_node(self, n):
        out = super().run_node(n)
        entry = n.meta.get(LOWERED_TAG)
        if entry and "kernel" in entry:
            ref = self.fake_outputs[entry["module"]]
            self.errors[entry["module"]] = _rel(out, ref)
            return ref
        return out


def _fake_then_lowered(arch: str, config, ids=IDS):
    """(fake-quant logits, lowered logits, lowering report, model, per-Linear teacher-forced errors).
    Every Linear is quantized (lm_head too: ``exclude=[]``) and lowered wherever a kernel exists."""
    config = dataclasses.replace(config, exclude=[])
    qm = gq.quantize(tiny_model(arch), config, [ids], progress=False, check=False)
    fake_outputs = {}
    with torch.no_grad():
        sites = {s.fqn: s.node for s in find_sites(qm.gm)}
        with probes(qm.gm, sites, lambda k, v: fake_outputs.__setitem__(k, v.clone())):
            ref = qm(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lower_model(qm, policy="all")
        out = qm(input_ids=ids).logits
        forced = _TeacherForced(qm.gm, fake_outputs)
        forced.run(ids, False)
    return ref, out, report, qm, forced.errors


def _assert_close(errors: dict, out, ref, report, quantized_activations: bool) -> None:
    """Every lowered Linear matches fake-quant to float rounding; logits to 1e-2 / 1e-4 (see top)."""
    assert set(errors) == {e["module"] for e in report["lowered"]}
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst
    assert _rel(out, ref) < (1e-2 if quantized_activations else 1e-4)


def _n_linears(qm) -> int:
    return sum(1 for e in qm.log if e.get("action") == "quantize_weight")


def _graph_targets(qm) -> set[str]:
    return {str(n.target) for n in qm.gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("arch,scheme", [
    ("llama", "w_int8_per_channel_a_int8_per_token"),
    ("qwen2", "w_int8_per_channel_a_int8_per_token"),
    ("opt", "w_int8_per_channel_a_int8_per_token"),
    ("llama", "w_int8_per_tensor_a_int8_per_tensor"),
    ("opt", "w_int8_per_tensor_a_int8_per_tensor"),
    ("llama", "w_int4_a_int8_per_token"),
])
def test_int8_w8a8_matches_fake_quant(arch, scheme):
    ref, out, report, qm, errors = _fake_then_lowered(arch, preset(scheme))
    assert len(report["lowered"]) == _n_linears(qm) and not report["fake_quant"]
    assert {e["kernel"] for e in report["lowered"]} == {"int8_linear"}
    targets = _graph_targets(qm)
    assert "graphquant.int8_linear.default" in targets
    assert not {"graphquant.dequantize.default", "graphquant.fake_quant.default",
                "graphquant.dynamic_fake_quant.default", "aten.linear.default"} & targets
    _assert_close(errors, out, ref, report, quantized_activations=True)


def test_shared_activation_quantizer_runs_once():
    _, _, _, qm, _ = _fake_then_lowered("llama", preset("w_int8_per_channel_a_int8_per_token"))
    n_quant = sum(1 for n in qm.gm.graph.nodes if "quantize_act" in str(n.target))
    # per layer: q/k/v share one, o one, gate/up share one, down one; plus lm_head
    assert n_quant == 2 * 4 + 1


@pytest.mark.parametrize("scheme", ["w_fp8_a_fp8", "w_fp8_a_fp8_per_token"])
def test_fp8_matches_fake_quant(scheme):
    ref, out, report, _, errors = _fake_then_lowered("llama", preset(scheme))
    assert {e["kernel"] for e in report["lowered"]} == {"fp8_linear"} and not report["fake_quant"]
    _assert_close(errors, out, ref, report, quantized_activations=True)


@pytest.mark.parametrize("arch,scheme,group,layout", [
    ("llama", "w_int4_per_group_sym", 32, "cpu_tinygemm"),
    ("qwen2", "w_uint4_per_group_asym", 32, "cpu_tinygemm"),
    ("opt", "w_uint4_per_group_asym", 64, "cpu_tinygemm"),
    ("llama", "w_uint4_per_group_asym", 16, "nibble"),  # group 16: torch unpack path (no CPU tinygemm)
])
def test_int4_weight_only_matches_fake_quant(arch, scheme, group, layout):
    ref, out, report, qm, errors = _fake_then_lowered(arch, _grouped(scheme, group))
    assert len(report["lowered"]) == _n_linears(qm) and not report["fake_quant"]
    assert {(e["kernel"], e["layout"], e["group_size"]) for e in report["lowered"]} == {("int4_linear", layout, group)}
    _assert_close(errors, out, ref, report, quantized_activations=False)


def test_int8_weight_only_matches_fake_quant():
    ref, out, report, _, errors = _fake_then_lowered("qwen2", preset("w_int8_per_tensor"))
    assert {e["kernel"] for e in report["lowered"]} == {"int8_weight_only"}
    _assert_close(errors, out, ref, report, quantized_activations=False)


def test_weight_bytes_shrink():
    """int8 kernel weights are ~1/4 of the float32 weights, packed int4 ~1/8 (plus group scales)."""
    model = tiny_model("llama")
    fp32 = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    _, _, rep8, qm8, _ = _fake_then_lowered("llama", preset("w_int8_per_channel_a_int8_per_token"))
    ratio8 = rep8["weight_bytes"]["lowered"] / fp32
    assert 0.25 <= ratio8 < 0.27, ratio8
    _, _, rep4, _, _ = _fake_then_lowered("llama", _grouped("w_int4_per_group_sym", 32))
    ratio4 = rep4["weight_bytes"]["lowered"] / fp32
    assert 0.125 <= ratio4 < 0.2, ratio4
    # the model itself holds no float copy of a lowered weight nor the fake-quant codes
    names = [n for n, _ in qm8.gm.named_buffers()] + [n for n, _ in qm8.gm.named_parameters()]
    assert not [n for n in names if n.endswith(("weight_q", "weight_zero_point")) or n.endswith("proj.weight")]
    assert qm8.parameter_bytes() < sum(p.numel() * 4 for p in model.parameters()) - 0.7 * fp32


def test_mxfp4_falls_back_with_a_clear_message():
    cfg = preset("w_mxfp4_a_mxfp4")
    qm = gq.quantize(tiny_model("llama"), cfg, [IDS], progress=False, check=False)
    with torch.no_grad():
        ref = qm(input_ids=IDS).logits
    with pytest.warns(UserWarning, match="stay fake-quant — MX formats have no kernel"):
        report = lower_model(qm, policy="all")
    assert not report["lowered"] and len(report["fake_quant"]) == _n_linears(qm)
    assert all("MX" in e["reason"] for e in report["fake_quant"])
    with torch.no_grad():
        assert torch.equal(qm(input_ids=IDS).logits, ref)


def test_int2_and_asymmetric_activations_fall_back():
    int2 = Config(global_quant_config=QuantizationConfig(
        weight=QuantizationSpec(dtype="int2", qscheme="per_channel", ch_axis=0)))
    ref, out, report, _, errors = _fake_then_lowered("llama", int2)
    assert not report["lowered"] and "int2" in report["fake_quant"][0]["reason"]
    assert torch.equal(out, ref)
    c = choose(QuantizationSpec(dtype="int8", qscheme="per_channel", ch_axis=0),
               QuantizationSpec(dtype="uint8", qscheme="per_tensor", symmetric=False), 64, torch.float32)
    assert c.kernel is None and "uint8" in c.reason
    c = choose(QuantizationSpec(dtype="int8", qscheme="per_channel", ch_axis=0),
               QuantizationSpec(dtype="int8", qscheme="per_token", is_dynamic=True, symmetric=False), 64, torch.float32)
    assert c.kernel is None and "asymmetric" in c.reason
    c = choose(QuantizationSpec(dtype="int4", qscheme="per_channel", ch_axis=0),
               QuantizationSpec(dtype="int4", qscheme="per_token", is_dynamic=True), 64, torch.float32)
    assert c.kernel is None and "int4" in c.reason


def test_kv_cache_quantizers_stay_fake_and_are_reported():
    kv_scheme = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token"
    ref, out, report, qm, errors = _fake_then_lowered("llama", preset(kv_scheme))
    assert len(report["lowered"]) == _n_linears(qm)
    kv = [e for e in report["fake_quant"] if "KV-cache" in e["reason"]]
    assert len(kv) == 4  # K and V of two layers
    _assert_close(errors, out, ref, report, quantized_activations=True)


def test_quantize_lower_true_and_torch_compile():
    ids = torch.randint(0, 128, (3, 11))
    qm = gq.quantize(tiny_model("llama", num_layers=1), preset("w_int8_per_channel_a_int8_per_token"), [IDS],
                     progress=False, lower="all")
    assert qm.lowering["lowered"] and any(e.get("action") == "lower" for e in qm.log)
    compiled = torch.compile(qm, dynamic=True)
    with torch.no_grad():
        for x in (IDS, ids):
            eager = qm(input_ids=x).logits
            assert _rel(compiled(input_ids=x).logits, eager) < 1e-5


def test_lowered_ops_have_consistent_fake_kernels():
    from graphquant.lowering import ops  # noqa: F401

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g)
    q, s = torch.ops.graphquant.quantize_act_dynamic(x, "int8:per_token:sym:dynamic:float:half_even")
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    ws = torch.rand(32, generator=g)
    torch.library.opcheck(torch.ops.graphquant.quantize_act_dynamic.default,
                          (x, "int8:per_token:sym:dynamic:float:half_even", False))
    torch.library.opcheck(torch.ops.graphquant.int8_linear.default, (q, s, w, ws, None, torch.float32))
    torch.library.opcheck(torch.ops.graphquant.int8_weight_only_linear.default, (x, w, ws, torch.randn(32)))
    packed = torch.randint(0, 256, (32, 32), dtype=torch.uint8, generator=g)
    torch.library.opcheck(torch.ops.graphquant.int4_linear.default,
                          (x, packed, torch.rand(32, 2, generator=g), None, None, 32, "nibble"))
    torch.library.opcheck(torch.ops.graphquant.int4_linear.default,
                          (x, packed, torch.rand(32, 2, generator=g), None, None, 32, "nibble", True))
    torch.library.opcheck(torch.ops.graphquant.int4_linear.default,
                          (x, packed[:, :16], torch.rand(32, 1, generator=g), None, None, 32, "nibble", False, True))
    y = torch.ops.graphquant.int8_linear(q, s, w, ws, None, torch.float32)
    assert y.shape == (3, 5, 32)
    ref = (q.float() * s) @ (w.float() * ws[:, None]).t()
    assert _rel(y, ref) < 1e-6


def test_int4_linear_with_hadamard_is_the_hadamard_then_the_product():
    """``graphquant::int4_linear(..., hadamard=True)`` (a W4A16 QuantLinear's online R4 inside the op; at one row on
    CUDA it may make the decode kernel's operand itself) is ``hadamard_transform`` then the product, on the CPU
    layouts too, for one and several rows."""
    from graphquant import hadamard  # noqa: F401  registers graphquant::hadamard_transform
    from graphquant.lowering import layouts, ops  # noqa: F401
    from graphquant.quant import fake_quant as FQ

    g = torch.Generator().manual_seed(3)
    n = 384  # 3 x 128: a non-power-of-two order
    spec = FQ.as_spec(preset("w_int4_per_group_sym").global_quant_config.weight)
    seen = set()
    for N in (24, 32):  # the nibble layout; torch's CPU int4 layout (N a multiple of 16)
        qw = FQ.quantize_weight(torch.randn(N, n, generator=g), spec)
        kw = layouts.int4_weight(qw.qdata, qw.scale, qw.zero_point, spec, torch.float32)
        t, args = kw.tensors, kw.args
        seen.add(args["layout"])
        for rows in (1, 3):
            x = torch.randn(rows, n, generator=g)
            got = torch.ops.graphquant.int4_linear(x, t["qweight"], t["qscale"], t.get("qzeros"), None,
                                                   args["group_size"], args["layout"], True)
            xr = torch.ops.graphquant.hadamard_transform(x, False)
            want = torch.ops.graphquant.int4_linear(xr, t["qweight"], t["qscale"], t.get("qzeros"), None,
                                                    args["group_size"], args["layout"])
            assert torch.equal(got, want), (args["layout"], rows)
    assert seen == {"nibble", "cpu_tinygemm"}


def test_int4_linear_gated_is_the_silu_mul_then_the_product():
    """``graphquant::int4_linear(..., gated=True)`` (a gated MLP's gate|up pair handed to its W4A16 down projection;
    at one row on CUDA the decode kernel's operand launch computes the SiLU·mul) is ``silu(gate) * up`` (in fp32,
    rounded once) then the product, on the CPU layouts too, for one and several rows; with the R4 after it."""
    from graphquant import hadamard  # noqa: F401  registers graphquant::hadamard_transform
    from graphquant.kernels.int4_mm import silu_mul
    from graphquant.lowering import layouts, ops  # noqa: F401
    from graphquant.quant import fake_quant as FQ

    g = torch.Generator().manual_seed(4)
    n = 256
    spec = FQ.as_spec(preset("w_int4_per_group_sym").global_quant_config.weight)
    seen = set()
    for N in (24, 32):  # the nibble layout; torch's CPU int4 layout
        qw = FQ.quantize_weight(torch.randn(N, n, generator=g), spec)
        for dtype in (torch.float32, torch.bfloat16):
            kw = layouts.int4_weight(qw.qdata, qw.scale, qw.zero_point, spec, dtype)
            t, args = kw.tensors, kw.args
            seen.add(args["layout"])
            for rows, hadamard_too in ((1, False), (3, False), (2, True)):
                pair = (torch.randn(rows, 2 * n, generator=g) * 3).to(dtype)
                call = functools.partial(torch.ops.graphquant.int4_linear, w_packed=t["qweight"], scale=t["qscale"],
                                         zero_point=t.get("qzeros"), bias=None, group_size=args["group_size"],
                                         layout=args["layout"], hadamard=hadamard_too)
                got = call(pair, gated=True)
                h = silu_mul(pair)
                assert h.dtype == dtype and torch.equal(
                    h.float(), (torch.nn.functional.silu(pair[:, :n].float()) * pair[:, n:].float()).to(dtype).float())
                assert torch.equal(got, call(h)), (args["layout"], rows, dtype)
    assert seen == {"nibble", "cpu_tinygemm"}


@pytest.mark.parametrize("spec", ["int8:per_token:sym:dynamic:float:half_even",
                                  "fp8_e4m3:per_token:sym:dynamic:float:half_even",
                                  "int8:per_tensor:sym:dynamic:float:half_even"])
def test_compiled_activation_quantization_gives_fake_quant_codes(spec):
    """Under torch.compile the quantizer is traced as torch ops (so Inductor can fuse it): same codes."""
    from graphquant.lowering.activation import quantize_act_dynamic_node
    from graphquant.quant import fake_quant as FQ

    x = torch.randn(4, 7, 96, generator=torch.Generator().manual_seed(2)) * 3
    q, s = torch.compile(quantize_act_dynamic_node, fullgraph=True)(x, spec)
    q2, s2, _ = FQ.dynamic_quantize(x, spec)
    assert torch.equal(s, s2.float()) and torch.equal(q.float(), q2.float())
