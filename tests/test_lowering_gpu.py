"""Lowering on CUDA (bf16): kernels vs torch references, lowered vs fake-quant logits, compile,
CUDA graphs, and gq-llama-20m when its folder is present. Skipped without CUDA.

In bf16, fake-quant rounds every dequantized activation and weight to bf16 before its matmul while
the kernels multiply the codes exactly, so the two differ by bf16 noise; where activations are
quantized, that noise moves some later activations across a rounding boundary (one code step: 1/127
for int8, up to 1/8 for fp8 e4m3), which the logits then carry. So: every lowered Linear is checked
against its fake-quant twin on the *same* input (teacher forcing) at 1e-2, weight-only models end to
end at 1e-2, and W8A8 models end to end at a bound that catches real bugs (5e-2 int8, 1.5e-1 fp8).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import torch

import graphquant as gq
from graphquant.config import Config, QuantizationConfig, QuantizationSpec, preset
from graphquant.calibrate import probes
from graphquant.lowering import find_sites, lower_model
from graphquant.models.tiny import tiny_model
from graphquant.quant import fake_quant as FQ
from test_lowering import _TeacherForced, _rel  # noqa: E402  (same helpers as the CPU tests)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[1]
GQ20M = next((p for p in (REPO / ".devdata" / "gq-llama-20m",
                          Path(os.environ.get("GRAPHQUANT_SHARED", REPO.parent / "shared")) / "data" / "models"
                          / "gq-llama-20m") if (p / "config.json").is_file()), None)


def _grouped(name: str, group: int) -> Config:
    cfg = preset(name)
    qc = cfg.global_quant_config
    weight = qc.weight.evolve(group_size=group)
    return dataclasses.replace(cfg, global_quant_config=dataclasses.replace(qc, weight=weight))


def _w8a16() -> Config:
    return Config(global_quant_config=QuantizationConfig(
        weight=QuantizationSpec(dtype="int8", qscheme="per_channel", ch_axis=0)))


SCHEMES = {
    "int8_token": lambda: preset("w_int8_per_channel_a_int8_per_token"),
    "int8_tensor_static": lambda: preset("w_int8_per_tensor_a_int8_per_tensor"),
    "fp8_tensor_static": lambda: preset("w_fp8_a_fp8"),
    "fp8_token": lambda: preset("w_fp8_a_fp8_per_token"),
    "int4_sym_g32": lambda: _grouped("w_int4_per_group_sym", 32),
    "uint4_asym_g32": lambda: _grouped("w_uint4_per_group_asym", 32),
    "w8a16": _w8a16,
}


# ------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("M", [1, 5, 300])
def test_quantize_rows_matches_fake_quant_codes(fp8, M):
    from graphquant.kernels import quant_triton as QT

    from test_decode_kernels_gpu import assert_codes_of_fake_quant

    x = (torch.randn(M, 4096, device="cuda") * 3).to(torch.bfloat16)
    assert_codes_of_fake_quant(lambda st: QT.quantize_rows(x, fp8, static_scale=st), x, fp8)


@pytest.mark.parametrize("M", [1, 16, 64, 300])
@pytest.mark.parametrize("N,K", [(1024, 4096), (4096, 14336)])
def test_linear_kernels_match_references(M, N, K):
    from graphquant.kernels import fp8_mm, int4_mm, int8_mm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=g)
    ws = torch.rand(N, device="cuda", generator=g) * 1e-2 + 1e-3
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    errs = {}
    q, s, _ = FQ.dynamic_quantize(x, "int8:per_token:sym:dynamic:float:half_even")
    ref = ((q.float() * s) @ (w.float() * ws[:, None]).t() + bias.float())
    errs["int8 W8A8"] = _rel(int8_mm.int8_linear(q, s, w, ws, bias, torch.bfloat16), ref)
    wf = (w.float() / 127 * 448).to(torch.float8_e4m3fn)
    qf, sf, _ = FQ.dynamic_quantize(x, "fp8_e4m3:per_token:sym:dynamic:float:half_even")
    ref = (qf.float() * sf) @ (wf.float() * ws[:, None]).t()
    errs["fp8 row-wise"] = _rel(fp8_mm.fp8_linear(qf, sf, wf, ws, None, torch.bfloat16), ref)
    s1, w1 = sf.amax(), ws[:1].reshape(())
    qt = FQ.quantize(x, s1, torch.zeros((), dtype=torch.int32, device="cuda"),
                     "fp8_e4m3:per_tensor:sym:static:float:half_even")
    ref = (qt.float() * s1) @ (wf.float() * w1).t()
    errs["fp8 per-tensor"] = _rel(fp8_mm.fp8_linear(qt, s1, wf, w1, None, torch.bfloat16), ref)
    ref = x.float() @ (w.float() * ws[:, None]).to(torch.bfloat16).float().t()
    errs["W8A16"] = _rel(int8_mm.int8_weight_only_linear(x, w, ws, None), ref)
    u = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8, generator=g)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    sc = torch.rand(N, K // 128, device="cuda", generator=g) * 1e-2
    zp = torch.randint(0, 16, (N, K // 128), device="cuda", dtype=torch.uint8, generator=g)
    for z in (zp, None):
        zz = z.float().repeat_interleave(128, 1) if z is not None else 8.0
        wd = ((u.float() - zz) * sc.repeat_interleave(128, 1)).to(torch.bfloat16)
        ref = x.float() @ wd.float().t()
        errs[f"W4A16 zero={z is not None}"] = _rel(int4_mm.int4_linear(x, packed, sc, z, None, 128, "nibble"), ref)
    bad = {k: v for k, v in errs.items() if not v < 1e-2}
    assert not bad, (M, N, K, errs)


# ------------------------------------------------------------------------------------ models


def _fake_vs_lowered(model, config, batches):
    qm = gq.quantize(model, config, batches[:1], progress=False, check=False)
    fake_outputs = {}
    with torch.no_grad():
        sites = {s.fqn: s.node for s in find_sites(qm.gm)}
        with probes(qm.gm, sites, lambda k, v: fake_outputs.__setitem__(k, v.clone())):
            refs = [qm(input_ids=b).logits for b in batches[:1]]
        refs += [qm(input_ids=b).logits for b in batches[1:]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lower_model(qm)
        outs = [qm(input_ids=b).logits for b in batches]
        forced = _TeacherForced(qm.gm, fake_outputs)
        forced.run(batches[0], False)
    return qm, report, refs, outs, forced.errors


E2E_BOUND = {"int8": 5e-2, "fp8": 1.5e-1}


def _check(scheme, report, refs, outs, errors):
    assert set(errors) == {e["module"] for e in report["lowered"]}
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-2, (scheme, worst)
    bound = next((b for k, b in E2E_BOUND.items() if scheme.startswith(k)), 1e-2)
    e2e = [_rel(out, ref) for ref, out in zip(refs, outs)]
    print(f"{scheme}: worst Linear {worst[1]:.2e} ({worst[0]}), logits {['%.2e' % e for e in e2e]}")
    assert max(e2e) <= bound, (scheme, e2e)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lowered_matches_fake_quant_bf16(arch, scheme):
    model = tiny_model(arch).to("cuda", torch.bfloat16)
    batches = [torch.randint(0, 128, shape, device="cuda") for shape in ((4, 32), (1, 8), (16, 1))]
    qm, report, refs, outs, errors = _fake_vs_lowered(model, SCHEMES[scheme](), batches)
    assert report["lowered"] and not [e for e in report["fake_quant"] if "KV" not in e["reason"]]
    _check(scheme, report, refs, outs, errors)


def test_compile_and_cuda_graph_of_lowered_model():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    qm = gq.quantize(model, preset("w_int8_per_channel_a_int8_per_token"), [ids], progress=False, lower=True)
    with torch.no_grad():
        eager = qm(input_ids=ids).logits
        # compiled, the quantizers are Inductor code (other float rounding): bound as W8A8 end to end
        assert _rel(torch.compile(qm)(input_ids=ids).logits, eager) < E2E_BOUND["int8"]
        step = torch.randint(0, 128, (4, 1), device="cuda")
        want = qm(input_ids=step).logits
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                qm(input_ids=step)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = qm(input_ids=step).logits
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(got, want) < 1e-3


@pytest.mark.skipif(GQ20M is None, reason="gq-llama-20m not found (.devdata/gq-llama-20m or shared data)")
@pytest.mark.parametrize("scheme", ["int8_token", "fp8_token", "int4_sym_g32", "w8a16"])
def test_gq_llama_20m_lowered_matches_fake_quant(scheme):
    from graphquant.models.hf import load_model

    model, _ = load_model(GQ20M)
    model = model.to("cuda", torch.bfloat16)
    batches = [torch.randint(0, model.config.vocab_size, shape, device="cuda") for shape in ((2, 128), (1, 1))]
    qm, report, refs, outs, errors = _fake_vs_lowered(model, SCHEMES[scheme](), batches)
    assert len(report["lowered"]) >= 7 * model.config.num_hidden_layers
    _check(scheme, report, refs, outs, errors)
