"""Accuracy methods for real pretrained LLMs (issue 11), on tiny models:

- per-group weights whose group_size does not divide in_features (a shorter last group), through RTN,
  GPTQ and AWQ, and the lowering refusing them with a reason;
- ``SinkTokenConfig``: static activation ranges without the first (attention-sink) token.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import graphquant as gq
from graphquant.config import (AWQConfig, Config, GPTQConfig, QuantizationConfig, QuantizationSpec,
                               SinkTokenConfig, preset)
from graphquant.models.tiny import tiny_model
from graphquant.passes.quantize import QDQ_TAG


def _calib(n=4, shape=(2, 32), seed=2, first=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, shape, generator=g)
        if first is not None:
            ids[:, 0] = first
        out.append(ids)
    return out


def _logits(m, ids):
    with torch.no_grad():
        out = m(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out


def _rel_err(model, qm, ids):
    ref = _logits(model, ids)
    return float((_logits(qm, ids) - ref).pow(2).mean() / ref.pow(2).mean())


# ------------------------------------------------------------------------------ group size not dividing K
def _w4_g48(algo=None):
    spec = QuantizationSpec(dtype="uint4", qscheme="per_group", symmetric=False, group_size=48)
    return Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["*lm_head"], algo_config=algo)


@pytest.mark.parametrize("algo", [None, GPTQConfig(), AWQConfig(grid=2)], ids=["rtn", "gptq", "awq"])
def test_group_size_not_dividing_in_features_runs_rtn_gptq_awq(algo):
    """in_features 64 / 128 with groups of 48: 48+16 and 48+48+32. The stored weight sits on the grid of
    its own scales, and the result stays close to float."""
    from graphquant.passes.gptq import grid_roundtrip_error
    from graphquant.quant.fake_quant import dequantize

    model = tiny_model("llama")
    qm = gq.quantize(model, _w4_g48([algo] if algo else None), _calib(2), progress=False)
    gm = qm.gm
    spec = _w4_g48().global_quant_config.weight
    for fqn, k in (("model.layers.0.self_attn.q_proj", 64), ("model.layers.1.mlp.down_proj", 128)):
        scale = gm.get_buffer(f"{fqn}.weight_scale")
        assert scale.shape[1] == -(-k // 48), (fqn, scale.shape)
        w = dequantize(gm.get_buffer(f"{fqn}.weight_q"), scale, gm.get_buffer(f"{fqn}.weight_zero_point"), spec)
        assert w.shape[1] == k
        assert grid_roundtrip_error(w, spec) < 1e-3  # re-quantizing with min/max qparams changes nothing
    err = _rel_err(model, qm, _calib(1, (4, 48), seed=9)[0])
    assert err < 0.05, err


def test_rtn_groups_not_dividing_are_better_than_one_group_per_row():
    """A shorter last group still has its own scale: error below per-channel (one group per row)."""
    model = tiny_model("llama")
    ids = _calib(1, (4, 48), seed=9)[0]
    per_group = gq.quantize(model, _w4_g48(), None, progress=False)
    pc = QuantizationSpec(dtype="uint4", qscheme="per_channel", symmetric=False, ch_axis=0)
    per_row = gq.quantize(model, Config(global_quant_config=QuantizationConfig(weight=pc), exclude=["*lm_head"]),
                          None, progress=False)
    assert _rel_err(model, per_group, ids) < _rel_err(model, per_row, ids)


def test_int4_lowering_refuses_a_shorter_last_group_with_a_reason():
    from graphquant.lowering.schemes import choose

    spec = QuantizationSpec(dtype="uint4", qscheme="per_group", symmetric=False, group_size=48)
    choice = choose(spec, None, 64, torch.float32)
    assert choice.kernel is None and "shorter last group" in choice.reason
    assert choose(dataclasses.replace(spec, group_size=32), None, 64, torch.float32).kernel == "int4_linear"


# ------------------------------------------------------------------------------ sink tokens (PrefixQuant-style)
def test_prefix_fake_quant_op_splits_by_position():
    from graphquant.passes.sink_tokens import fake_quant_prefix
    from graphquant.quant.fake_quant import dynamic_fake_quantize, fake_quantize

    spec = preset("w_int8_per_tensor_a_int8_per_tensor").global_quant_config.input_tensors.to_op_str()
    from graphquant.passes.sink_tokens import _per_token_spec
    tok = _per_token_spec(spec)
    assert tok.startswith("int8:per_token:sym:dynamic")
    x = torch.randn(2, 5, 3, 8)
    x[:, :, 0] *= 100.0  # a massive first token along dim 2
    scale, zp = torch.tensor(0.02), torch.tensor(0, dtype=torch.int32)
    y = fake_quant_prefix(x, scale, zp, spec, 1, 2, "dynamic")
    assert torch.equal(y[:, :, 1:], fake_quantize(x[:, :, 1:], scale, zp, spec))
    assert torch.allclose(y[:, :, :1], dynamic_fake_quantize(x[:, :, :1].contiguous(), tok))
    assert (y[:, :, 0] - x[:, :, 0]).abs().max() < x[:, :, 0].abs().max() / 100  # not clipped at 127 * 0.02
    yf = fake_quant_prefix(x, scale, zp, spec, 2, 2, "float")
    assert torch.equal(yf[:, :, :2], x[:, :, :2])
    assert fake_quant_prefix(x[:, :, :1], scale, zp, spec, 3, 2, "float").shape == (2, 5, 1, 8)


def _sink_model():
    """A tiny Llama whose token 0 has a massive embedding in 4 channels; sequences start with it."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, :4] *= 300.0
    return model


def _static_cfg(algo=None, scheme="w_int8_per_tensor_a_int8_per_tensor"):
    return dataclasses.replace(preset(scheme), exclude=["*lm_head"], algo_config=algo)


def test_sink_tokens_lower_static_error_and_scales():
    model = _sink_model()
    calib = _calib(first=0)
    ids = _calib(1, (4, 40), seed=7, first=0)[0]
    plain = gq.quantize(model, _static_cfg(), calib, progress=False)
    sink = gq.quantize(model, _static_cfg([SinkTokenConfig()]), calib, progress=False)
    entries = [e for e in sink.log if e.get("action") == "sink_tokens"]
    assert len(entries) == 8  # q/k/v, o, gate/up, down inputs of 2 layers share 4 quantizers per layer
    assert all(e["scale_after"] <= e["scale_before"] + 1e-12 for e in entries)
    assert any(e["scale_after"] < 0.7 * e["scale_before"] for e in entries)
    nodes = [n for n in sink.quantizer_nodes() if n.meta[QDQ_TAG].get("sink_tokens")]
    assert len(nodes) == 8 and all(n.args[5] == 1 for n in nodes)  # sequence dim of (B, T, C) inputs
    e_plain, e_sink = _rel_err(model, plain, ids), _rel_err(model, sink, ids)
    assert e_sink < 0.8 * e_plain, (e_plain, e_sink)
    # the graph still runs on other batch sizes / lengths, including a single token
    assert _logits(sink, ids[:1, :1]).shape == (1, 1, 128)


def test_sink_tokens_with_kv_cache_quantizers_find_their_sequence_dim():
    model = _sink_model()
    cfg = _static_cfg([SinkTokenConfig(num_tokens=2, mode="float")],
                      "w_int8_per_tensor_a_int8_per_tensor_kv_cache_int8_per_tensor")
    qm = gq.quantize(model, cfg, _calib(first=0), progress=False)
    kv = [n for n in qm.quantizer_nodes() if n.meta[QDQ_TAG]["role"].startswith("kv")]
    assert kv and all(n.meta[QDQ_TAG].get("sink_tokens") == 2 for n in kv)
    assert all(n.args[5] == 2 for n in kv)  # (B, heads, T, head_dim)


def test_sink_tokens_on_dynamic_scheme_change_nothing():
    model = tiny_model("llama")
    qm = gq.quantize(model, _static_cfg([SinkTokenConfig()], "w_int8_per_channel_a_int8_per_token"), _calib(),
                     progress=False)
    assert any(e.get("pass") == "sink_tokens" and e.get("action") == "skip" for e in qm.log)
    assert not any(n.meta[QDQ_TAG].get("sink_tokens") for n in qm.quantizer_nodes())


@pytest.mark.parametrize("kw, msg", [(dict(num_tokens=0), "num_tokens"), (dict(mode="fp16"), "mode"),
                                     (dict(num_tokens=True), "num_tokens")])
def test_sink_token_config_validation(kw, msg):
    with pytest.raises(gq.ConfigError, match=msg):
        SinkTokenConfig(**kw)


def test_sink_token_config_round_trips_through_json():
    cfg = _static_cfg([SinkTokenConfig(num_tokens=2)])
    back = Config.from_json(cfg.to_json())
    assert back.algo_config == [SinkTokenConfig(num_tokens=2)]


# ------------------------------------------------------------------------------ sensitivity / auto_exclude
def test_layer_sensitivity_ranks_the_layer_that_was_made_fragile():
    from graphquant.sensitivity import layer_sensitivity

    model = tiny_model("llama")
    with torch.no_grad():  # one huge weight: per-tensor int4 of this Linear loses everything else
        w = model.model.layers[0].self_attn.o_proj.weight
        w[3, 5] = 40.0 * w.abs().max()
    spec = QuantizationSpec(dtype="int4", qscheme="per_tensor", symmetric=True)
    cfg = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["*lm_head"])
    qm = gq.quantize(model, cfg, None, keep_float_weights=True, progress=False)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    before = _logits(qm, ids)
    ranked = layer_sensitivity(qm, ids, batch_size=4)
    assert len(ranked) == 14 and ranked[0].fqn == "model.layers.0.self_attn.o_proj"
    assert ranked[0].delta_loss > 2 * ranked[1].delta_loss > 0 and all(a.delta_loss >= b.delta_loss for a, b in zip(ranked, ranked[1:]))
    assert torch.equal(_logits(qm, ids), before)  # the graph is restored


def test_auto_exclude_removes_the_costliest_layers():
    from graphquant.sensitivity import auto_exclude

    model = _sink_model()
    calib = _calib(first=0)
    qm, ranked = auto_exclude(model, _static_cfg(), calib, k=2)
    excluded = {e["module"] for e in qm.log if e.get("action") == "skip" and e.get("module")}
    assert {s.fqn for s in ranked[:2]} <= excluded
    plain = gq.quantize(model, _static_cfg(), calib, progress=False)
    ids = _calib(1, (4, 40), seed=7, first=0)[0]
    assert _rel_err(model, qm, ids) <= _rel_err(model, plain, ids)


def test_layer_sensitivity_needs_float_weights():
    from graphquant.errors import CalibrationError
    from graphquant.sensitivity import layer_sensitivity

    qm = gq.quantize(tiny_model("llama"), _static_cfg(), _calib(), progress=False)
    with pytest.raises(CalibrationError, match="keep_float_weights=True"):
        layer_sensitivity(qm, _calib(1)[0])


@pytest.mark.parametrize("which", ["kv", "all"])
def test_sink_float_weights_compute_the_first_token_in_float(which):
    """float_weights="all": position 0 is exactly the float model's (causal attention: token 0 sees only itself);
    "kv": only K/V projections get float weights, so position 0 is closer to float than without."""
    model = _sink_model()
    calib = _calib(first=0)
    ids = _calib(1, (2, 24), seed=3, first=0)[0]
    cfg = _static_cfg([SinkTokenConfig(mode="float", float_weights=which)], "w_int4_a_int8_per_token")
    qm = gq.quantize(model, cfg, calib, progress=False)
    plain = gq.quantize(model, _static_cfg(None, "w_int4_a_int8_per_token"), calib, progress=False)
    ref, out, base = _logits(model, ids), _logits(qm, ids), _logits(plain, ids)
    moved = [e["module"] for e in qm.log if e.get("action") == "sink_float_weights"]
    if which == "all":
        assert len(moved) == 14
        assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-4)
    else:
        assert sorted(m.rsplit(".", 1)[1] for m in moved) == ["k_proj", "k_proj", "v_proj", "v_proj"]
    assert (out[:, 1:] - ref[:, 1:]).abs().mean() < (base[:, 1:] - ref[:, 1:]).abs().mean()
    # only the float weights in use are kept
    kept = {n.target for n in qm.gm.graph.nodes if n.op == "get_attr" and n.target.endswith(".weight")}
    assert all(any(t.startswith(m) for m in moved) or "embed" in t or "lm_head" in t or "norm" in t for t in kept)


# ------------------------------------------------------------------------------ advice
def test_config_advice_warns_about_measured_regressions():
    from graphquant.advice import config_advice
    from graphquant.config import QuaRotConfig

    def cfg(scheme, pre=(), algo=None):
        return dataclasses.replace(preset(scheme), pre_quant_opt_config=list(pre), algo_config=algo)

    assert any("fp8" in n for n in config_advice(cfg("w_fp8_a_fp8", [QuaRotConfig()])))
    assert not any("rotation" in n for n in config_advice(cfg("w_fp8_a_fp8")))
    assert any("gptq" in n for n in config_advice(cfg("w_int4_a_int8_per_token", [QuaRotConfig()])))
    assert not config_advice(cfg("w_int4_a_int8_per_token", [QuaRotConfig()], [GPTQConfig()]))
    assert not config_advice(cfg("w_int4_a_int8_per_token", [QuaRotConfig(r1=False)]))
    assert any("sink_tokens" in n for n in config_advice(cfg("w_int8_per_tensor_a_int8_per_tensor")))
    assert not config_advice(cfg("w_int8_per_tensor_a_int8_per_tensor", [QuaRotConfig()], [SinkTokenConfig()]))


def test_cli_quantize_prints_the_advice(tiny_saved_llama, capsys):
    from graphquant.cli import main

    rc = main(["quantize", "--model", str(tiny_saved_llama), "--quant_scheme", "w_fp8_a_fp8",
               "--pre_quantization_optimization", "quarot", "--num_calib_data", "1", "--seq_len", "16"])
    err = capsys.readouterr().err
    assert "note: rotation with fp8" in err, err
    assert rc in (0, 2)  # the tiny model has no tokenizer: the advice comes first


@pytest.mark.parametrize("algo", [SinkTokenConfig(), SinkTokenConfig(float_weights="kv")], ids=["sink", "sink_kv"])
def test_lowering_keeps_the_function_of_sink_token_graphs(algo):
    model = _sink_model()
    calib = _calib(first=0)
    ids = _calib(1, (2, 24), seed=3, first=0)[0]
    fake = gq.quantize(model, _static_cfg([algo]), calib, progress=False)
    low = gq.quantize(model, _static_cfg([algo]), calib, progress=False, lower="all")  # every kernel, even where slower on CPU
    a, b = _logits(fake, ids), _logits(low, ids)
    assert torch.allclose(a, b, atol=1e-3 * a.abs().max()), (a - b).abs().max()
