"""Calibration algorithms: GPTQ, AWQ, AutoSmoothQuant (issue 7)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import graphquant as gq
from graphquant.config import (AWQConfig, AutoSmoothQuantConfig, Config, GPTQConfig, QuantizationConfig,
                               QuantizationSpec, QuaRotConfig, preset)
from graphquant.errors import CalibrationError, ConfigError
from graphquant.models.tiny import tiny_model
from graphquant.passes.gptq import (HessianAccumulator, LayerwiseRunner, codes_changed_by_rtn, gptq_quantize,
                                    grid_roundtrip_error, relative_output_error)
from graphquant.quant.fake_quant import quantize_weight


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run tiny matrices, where torch's thread pool only costs time (a lot of it on a
    loaded 2-core machine); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPECS = {
    "int4_per_channel": QuantizationSpec(dtype="int4", qscheme="per_channel", symmetric=True, ch_axis=0),
    "uint4_g32_asym": QuantizationSpec(dtype="uint4", qscheme="per_group", symmetric=False, group_size=32),
    "int4_g32_sym": QuantizationSpec(dtype="int4", qscheme="per_group", symmetric=True, group_size=32),
    "int8_per_channel": QuantizationSpec(dtype="int8", qscheme="per_channel", symmetric=True, ch_axis=0),
    "int8_per_tensor": QuantizationSpec(dtype="int8", qscheme="per_tensor", symmetric=True),
}


def _correlated(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + 0.5 * torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :3] *= 8.0  # a few outlier channels, as in LLM activations
    w = torch.randn(96, d, generator=g)
    return x, w


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc


# ----------------------------------------------------------------------------------------- GPTQ core
@pytest.mark.parametrize("act_order,static_groups", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_beats_rtn_on_correlated_inputs(name, act_order, static_groups):
    spec = SPECS[name]
    x, w = _correlated()
    acc = _hessian(x)
    res = gptq_quantize(w, acc.hessian, spec, act_order=act_order, static_groups=static_groups, block_size=32,
                        num_samples=acc.n)
    rtn = quantize_weight(w, spec).dequantize()
    err = float(((x @ (w - res.weight.float()).T) ** 2).mean())
    err_rtn = float(((x @ (w - rtn).T) ** 2).mean())
    print(f"{name} act_order={act_order} static_groups={static_groups}: GPTQ {err:.4g}  RTN {err_rtn:.4g} "
          f"ratio {err / err_rtn:.3f}")
    assert err < 0.8 * err_rtn
    assert abs(relative_output_error(w, res.weight, acc.hessian) * float((x @ w.T).pow(2).mean()) - err) < 1e-3 * err
    # insert_qdq re-derives min/max qparams from the written weight: it must find GPTQ's grid again
    assert grid_roundtrip_error(res.weight.float(), spec) < 1e-4
    assert codes_changed_by_rtn(res.weight.float(), res.weight, res.scale, res.zero_point, spec) == 0
    rt = quantize_weight(res.weight.float(), spec)
    assert torch.allclose(rt.scale, res.scale, rtol=1e-6, atol=0)
    assert torch.equal(rt.zero_point, res.zero_point.to(rt.zero_point.dtype))


@pytest.mark.parametrize("name", ["uint4_g32_asym", "int4_per_channel"])
def test_gptq_lazy_blocks_are_exact(name):
    """Lazy block updates (and the pending-update correction for groups first reached inside a
    block under act-order with dynamic groups) give the column-by-column result."""
    x, w = _correlated(d=96)
    H = _hessian(x).hessian
    kw = dict(act_order=True, static_groups=False)
    one = gptq_quantize(w, H, SPECS[name], block_size=1, **kw)
    blocked = gptq_quantize(w, H, SPECS[name], block_size=40, **kw)
    same = (one.weight == blocked.weight).float().mean()
    assert same > 0.999, same
    assert torch.allclose(one.scale, blocked.scale, rtol=1e-5)


def test_gptq_too_few_tokens_names_minimum():
    x, w = _correlated(n=64)
    acc = _hessian(x)
    with pytest.raises(CalibrationError, match="at least 128 calibration tokens"):
        gptq_quantize(w, acc.hessian, SPECS["int4_g32_sym"], num_samples=acc.n)


def test_gptq_singular_hessian_raises_damping():
    x, w = _correlated(n=512)
    x[:, 5:9] = 0.0  # dead channels
    with pytest.warns(UserWarning, match="singular Hessian.*4 of 128"):
        res = gptq_quantize(w, _hessian(x).hessian, SPECS["uint4_g32_asym"])
    assert torch.isfinite(res.weight).all() and res.dead == 4
    zeros = torch.zeros(512, 128)
    with pytest.warns(UserWarning, match="damping is raised"):
        res = gptq_quantize(w, _hessian(zeros).hessian, SPECS["int4_per_channel"])
    assert torch.isfinite(res.weight).all()
    # with no information every column is plain round-to-nearest
    assert torch.equal(res.weight.float(), quantize_weight(w, SPECS["int4_per_channel"]).dequantize())
    # not positive semi-definite (e.g. accumulated in low precision): damping grows until Cholesky works
    H = torch.eye(128, dtype=torch.float64)
    H[7, 7] = -0.05
    with pytest.warns(UserWarning, match="damping raised to"):
        res = gptq_quantize(w, H, SPECS["int4_per_channel"])
    assert torch.isfinite(res.weight).all() and res.damp > 0.01


@pytest.mark.parametrize("spec", [QuantizationSpec(dtype="fp8_e4m3", qscheme="per_channel", ch_axis=0),
                                  QuantizationSpec(dtype="mx", mx_element_dtype="fp4")])
def test_gptq_unsupported_scheme(spec):
    x, w = _correlated(n=256, d=64)
    with pytest.raises(ConfigError, match="int8, uint8, int4, uint4, int2"):
        gptq_quantize(w, _hessian(x).hessian, spec)


# ----------------------------------------------------------------------------------------- layer-wise runner
def _calib(n=8, shape=(2, 32), seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, shape, generator=g) for _ in range(n)]


def _held_out():
    return torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(99))


def test_layerwise_runner_reproduces_full_forward(tiny_analysis):
    from graphquant.calibrate import probes, run_batches

    captured = tiny_analysis("llama").captured
    from graphquant.patterns.base import AnalysisContext

    linears = list(AnalysisContext(captured).linears.values())
    taps = {lin.fqn: lin.node.args[0] for lin in linears}
    full: dict = {}
    with probes(captured.gm, taps, lambda k, x: full.setdefault(k, []).append(x.clone())):
        run_batches(captured, _calib(3), progress=False)
    runner = LayerwiseRunner(captured, _calib(3), linears)
    assert [b.key for b in runner.blocks] == ["model.layers.0", "model.layers.1", "lm_head"]
    got: dict = {}
    for block in runner.iterate():
        runner.run(block, {lin.fqn: taps[lin.fqn] for lin in block.linears},
                   lambda k, x: got.setdefault(k, []).append(x.clone()))
    assert set(got) == set(full)
    for k in full:
        for a, b in zip(full[k], got[k]):
            assert torch.equal(a, b), k


# ----------------------------------------------------------------------------------------- GPTQ end to end
def _w4(group_size=32, **kw):
    spec = QuantizationSpec(dtype="int4", qscheme="per_group", symmetric=True, group_size=group_size)
    return Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["*lm_head"], **kw)


def _mse(model, qm, ids):
    with torch.no_grad():
        return float(((model(input_ids=ids).logits - qm(input_ids=ids).logits) ** 2).mean())


def _rtn_copy(model, spec):
    """Weight-only round-to-nearest without a capture: every Linear but lm_head gets
    ``quantize_weight(W).dequantize()`` — what insert_qdq computes for a weight-only config."""
    import copy

    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in rtn.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                mod.weight.copy_(quantize_weight(mod.weight, spec).dequantize())
    return rtn


def _pass_context(tiny_analysis, config, calib):
    """A PassContext on the session's cached tiny-Llama capture (for error paths that raise
    before changing anything)."""
    from graphquant.passes import PassContext
    from graphquant.plan import make_plan

    an = tiny_analysis("llama")
    return PassContext(an.captured, an.report, make_plan(an.report), config=config, calib_data=calib)


def test_gptq_end_to_end_beats_rtn():
    model = tiny_model("llama")
    ids = _held_out()
    rtn = _rtn_copy(model, _w4().global_quant_config.weight)
    qm = gq.quantize(model, _w4(algo_config=[GPTQConfig()]), _calib(), progress=False)
    e_rtn, e_gptq = _mse(model, lambda **kw: rtn(**kw), ids), _mse(model, qm, ids)
    print(f"W4 g32 logits MSE: RTN {e_rtn:.4g}  GPTQ {e_gptq:.4g}")
    assert e_gptq < 0.9 * e_rtn
    entries = [e for e in qm.log if e.get("action") == "gptq"]
    assert len(entries) == 14 and all(e["codes_changed_by_rtn"] == 0 for e in entries)
    assert all(e["output_error"] < e["output_error_rtn"] for e in entries)
    assert qm.captured.param("model.layers.1.mlp.down_proj.weight_q").dtype == torch.int8  # stored as int4 codes
    # plain GPTQ: no act-order, groups from the updated weights, all Linears of a layer at once
    plain = GPTQConfig(desc_act=False, static_groups=False, true_sequential=False, block_size=16)
    qm2 = gq.quantize(model, _w4(algo_config=[plain]), _calib(), progress=False)
    e_plain = _mse(model, qm2, ids)
    print(f"W4 g32 logits MSE, GPTQ without act-order/static groups/true-sequential: {e_plain:.4g}")
    assert e_plain < 0.9 * e_rtn


def test_quarot_gptq_w4a8_beats_quarot_rtn():
    model = tiny_model("llama")
    ids = _held_out()
    cfg = dataclasses.replace(preset("w_int4_a_int8_per_token"), exclude=["*lm_head"],
                              pre_quant_opt_config=[QuaRotConfig()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtn = gq.quantize(model, cfg, _calib(), progress=False)
        qm = gq.quantize(model, dataclasses.replace(cfg, algo_config=[GPTQConfig()]), _calib(), progress=False)
    e_rtn, e_gptq = _mse(model, rtn, ids), _mse(model, qm, ids)
    print(f"QuaRot W4A8 logits MSE: RTN {e_rtn:.4g}  GPTQ {e_gptq:.4g}")
    assert e_gptq < 0.9 * e_rtn
    # GPTQ ran after the online R4 Hadamard: down_proj's Hessian is in the rotated basis
    names = [e["pass"] for e in qm.log]
    assert names.index("online_r4") < names.index("gptq") < names.index("insert_qdq")


def test_gptq_bad_input(tiny_analysis):
    from graphquant.passes.gptq import gptq

    few = [torch.randint(0, 128, (1, 16))]  # 16 tokens; down_proj has in_features 128
    with pytest.raises(CalibrationError, match=r"at least 128 calibration tokens.*down_proj.*got 16"):
        gptq(_pass_context(tiny_analysis, _w4(algo_config=[GPTQConfig()]), few))
    fp8 = Config(global_quant_config=QuantizationConfig(
        weight=QuantizationSpec(dtype="fp8_e4m3", qscheme="per_channel", ch_axis=0)), algo_config=[GPTQConfig()])
    with pytest.raises(ConfigError, match=r"GPTQ cannot quantize weights.*supports static integer weights"):
        gptq(_pass_context(tiny_analysis, fp8, _calib()))
    with pytest.raises(CalibrationError, match="calibration data"):
        gptq(_pass_context(tiny_analysis, _w4(algo_config=[GPTQConfig()]), None))
    # nothing was changed on the way
    graph = tiny_analysis("llama").captured.graph
    assert not any(n.op == "call_function" and "probe" in str(n.target) for n in graph.nodes)


# ----------------------------------------------------------------------------------------- AWQ
def _outlier_model():
    """Tiny Llama with planted outlier channels in the norm scales (large activations there)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 30.0
            layer.post_attention_layernorm.weight[[5, 40]] *= 30.0
    return model


def test_awq_never_worse_than_alpha0_and_beats_rtn():
    model = _outlier_model()
    spec = QuantizationSpec(dtype="uint4", qscheme="per_group", symmetric=False, group_size=32)
    cfg = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["*lm_head"])
    ids = _held_out()
    rtn = _rtn_copy(model, spec)
    qm = gq.quantize(model, dataclasses.replace(cfg, algo_config=[AWQConfig(grid=10)]), _calib(), progress=False)
    sites = [e for e in qm.log if e.get("action") == "awq"]
    assert {e["site"] for e in sites} == {"norm_linear", "attention_vo", "linear_linear"}
    assert len(sites) == 8  # 2 layers x (2 norms, v->o, up->down); final norm -> lm_head skipped
    for e in sites:
        print(f"{e['key']}: alpha {e['alpha']}  loss {e['loss']:.4g}  alpha=0 {e['loss_alpha0']:.4g}")
        assert e["loss"] <= e["loss_alpha0"]
    outlier_sites = [e for e in sites if e["site"] == "norm_linear"]
    assert all(e["alpha"] > 0 and e["loss"] < 0.5 * e["loss_alpha0"] for e in outlier_sites)
    clips = [e for e in qm.log if e.get("action") == "awq_clip"]
    assert len(clips) == 14 and all(e["loss_after"] <= e["loss_before"] for e in clips)
    e_rtn, e_awq = _mse(model, lambda **kw: rtn(**kw), ids), _mse(model, qm, ids)
    print(f"W4 g32 logits MSE (outlier model): RTN {e_rtn:.4g}  AWQ {e_awq:.4g}")
    assert e_awq < 0.7 * e_rtn


def test_awq_unsupported_scheme(tiny_analysis):
    from graphquant.passes.awq import awq

    for name in ("w_int8_per_tensor", "w_mxfp4_a_mxfp4"):
        cfg = dataclasses.replace(preset(name), algo_config=[AWQConfig()])
        with pytest.raises(ConfigError, match="AWQ cannot quantize weights.*supports static integer weights.*"
                                              "per_channel/per_group"):
            awq(_pass_context(tiny_analysis, cfg, _calib()))


# ----------------------------------------------------------------------------------------- AutoSmoothQuant
def test_autosmoothquant_logs_alpha_per_site():
    model = _outlier_model()
    alphas = (0.0, 0.25, 0.5, 0.75)
    cfg = dataclasses.replace(preset("w_int8_per_tensor_a_int8_per_tensor"), exclude=["*lm_head"])
    ids = _held_out()
    plain = gq.quantize(model, cfg, _calib(), progress=False)
    qm = gq.quantize(model, dataclasses.replace(cfg, algo_config=[AutoSmoothQuantConfig(alphas=alphas)]), _calib(),
                     progress=False)
    chosen = [e for e in qm.log if e.get("action") == "autosmooth_alpha"]
    smoothed = [e for e in qm.log if e.get("action") == "smooth"]
    assert len(chosen) == len(smoothed) == 6  # 2 layers x (2 norms + v->o)
    for c, s in zip(chosen, smoothed):
        print(f"{c['key']}: alpha {c['alpha']} losses {c['losses']}")
        assert c["alpha"] in alphas and s["alpha"] == c["alpha"] and c["pass"] == "autosmoothquant"
        assert c["loss"] == min(c["losses"].values())
    assert qm.equivalence["autosmoothquant"] < 1e-3  # checked as a function-preserving rewrite
    e_plain, e_auto = _mse(model, plain, ids), _mse(model, qm, ids)
    print(f"W8A8 static logits MSE: plain {e_plain:.4g}  AutoSmoothQuant {e_auto:.4g}")
    assert e_auto < e_plain


def test_autosmoothquant_through_rewrite_uses_int8_default():
    model = tiny_model("llama")
    fm = gq.rewrite(model, [AutoSmoothQuantConfig(alphas=(0.3, 0.6))], calib_data=_calib(2))
    chosen = [e for e in fm.log if e.get("action") == "autosmooth_alpha"]
    assert len(chosen) == 6 and all(e["alpha"] in (0.3, 0.6) for e in chosen)
    ids = _held_out()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fm(input_ids=ids).logits, atol=1e-4)
