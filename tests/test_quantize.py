"""Quantization pipeline: Q/DQ insertion, calibration, entry points, bad input (issue: quantization core)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import graphquant as gq
from graphquant.config import (Config, QuantizationConfig, QuantizationSpec, QuaRotConfig, SmoothQuantConfig,
                               preset)
from graphquant.equivalence import relative_error
from graphquant.models.tiny import tiny_model
from graphquant.passes.quantize import QDQ_TAG


def _ids(shape=(3, 11), seed=1):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _calib(n=2):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def _roles(qm):
    out = {}
    for n in qm.quantizer_nodes():
        r = n.meta[QDQ_TAG]["role"]
        out[r] = out.get(r, 0) + 1
    return out


def test_w8a8_static_counts_and_accuracy():
    model = tiny_model("llama")
    cfg = dataclasses.replace(preset("w_int8_per_tensor_a_int8_per_tensor"), exclude=["*lm_head"])
    qm = gq.quantize(model, cfg, _calib(), progress=False)
    roles = _roles(qm)
    assert roles["weight"] == 14  # 7 linears x 2 layers, lm_head excluded
    assert roles["input"] == 8  # q/k/v share one, gate/up share one, o, down: 4 per layer
    ref = model(input_ids=_ids()).logits
    out = qm(input_ids=_ids()).logits
    err = relative_error(ref, out)
    assert 0 < err < 0.1
    # weights are stored in int8
    assert qm.captured.param("model.layers.0.mlp.down_proj.weight_q").dtype == torch.int8
    assert any(e["action"] == "skip" and e["module"] == "lm_head" for e in qm.log)


def test_disabled_quantizers_equal_rewritten_float_model():
    model = tiny_model("qwen2")
    pre = [SmoothQuantConfig(alpha=0.5), QuaRotConfig()]
    cfg = dataclasses.replace(preset("w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token"),
                              pre_quant_opt_config=pre)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = gq.quantize(model, cfg, _calib(), keep_float_weights=True, progress=False)
        fm = gq.rewrite(model, pre, calib_data=_calib())
    ids = _ids()
    quantized = qm(input_ids=ids).logits
    qm.disable_quantizers()
    assert torch.equal(qm(input_ids=ids).logits, fm(input_ids=ids).logits)
    qm.enable_quantizers()
    assert torch.equal(qm(input_ids=ids).logits, quantized)


def test_kv_cache_quantizers_sit_after_rope_and_r3():
    model = tiny_model("llama")
    cfg = dataclasses.replace(preset("w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token"),
                              pre_quant_opt_config=[QuaRotConfig()])
    qm = gq.quantize(model, cfg, _calib(), progress=False)
    kv = [n for n in qm.quantizer_nodes() if n.meta[QDQ_TAG]["role"] in ("kv_k", "kv_v")]
    assert len(kv) == 4
    for n in kv:
        assert any(u.target == torch.ops.aten.scaled_dot_product_attention.default for u in n.users)
        if n.meta[QDQ_TAG]["role"] == "kv_k":
            assert n.args[0].target == torch.ops.graphquant.hadamard_transform.default  # R3 first


def test_quark_style_kv_cache_via_layer_quant_config():
    spec8 = QuantizationSpec(dtype="int8", qscheme="per_tensor")
    base = preset("w_int8_per_tensor_a_int8_per_tensor")
    kv = QuantizationConfig(input_tensors=spec8, weight=spec8, output_tensors=spec8)
    cfg = dataclasses.replace(base, layer_quant_config={"*k_proj": kv, "*v_proj": kv})
    qm = gq.quantize(tiny_model("llama"), cfg, _calib(), progress=False)
    roles = _roles(qm)
    assert roles.get("kv_k") == 2 and roles.get("kv_v") == 2 and "output" not in roles


def test_layer_config_precedence_and_exclude():
    w4 = QuantizationSpec(dtype="int4", qscheme="per_group", group_size=32)
    cfg = dataclasses.replace(preset("w_int8_per_tensor"),
                              layer_quant_config={"*down_proj": QuantizationConfig(weight=w4)},
                              exclude=["*layers.0.mlp.down_proj", "*lm_head"])
    qm = gq.quantize(tiny_model("llama"), cfg, None, progress=False)
    specs = {n.meta[QDQ_TAG]["module"]: n.meta[QDQ_TAG]["spec"] for n in qm.quantizer_nodes()}
    assert "model.layers.0.mlp.down_proj" not in specs and "lm_head" not in specs
    assert specs["model.layers.1.mlp.down_proj"].startswith("int4:per_group")
    assert specs["model.layers.1.mlp.up_proj"].startswith("int8:per_tensor")


def test_group_size_larger_or_not_dividing_in_features_gives_a_shorter_last_group():
    """w_int4_per_group_sym (g128) on in_features 64 and 128: one short group, or exact groups; the model is
    untouched."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = gq.quantize(model, "w_int4_per_group_sym", None, progress=False)
    gm = qm.gm
    assert tuple(gm.get_buffer("model.layers.0.self_attn.q_proj.weight_scale").shape) == (64, 1)  # K=64
    assert tuple(gm.get_buffer("model.layers.0.mlp.down_proj.weight_scale").shape) == (64, 1)  # K=128
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_unknown_scheme():
    with pytest.raises(gq.ConfigError, match="w_int8_per_tensor"):
        gq.quantize(tiny_model("llama"), "w_int8_per_tensr", _calib())


def test_exclude_glob_matching_nothing_warns_with_layer_names():
    cfg = dataclasses.replace(preset("w_int8_per_tensor"), exclude=["*no_such_layer"])
    with pytest.warns(UserWarning, match=r"no_such_layer.*match no layer.*q_proj"):
        gq.quantize(tiny_model("llama"), cfg, None, progress=False)


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    (["not a tensor"], "tensors or dicts"),
    ([torch.randint(0, 128, (2, 3, 4))], "shape"),
    ([torch.randint(0, 100000, (2, 8))], "out of range"),
    ([{"input_ids": torch.randint(0, 128, (2, 8)), "pixel_values": torch.zeros(1)}], "pixel_values"),
    (5, "iterable"),
])
def test_bad_calibration_data(bad, match):
    with pytest.raises(gq.CalibrationError, match=match):
        gq.quantize(tiny_model("llama"), "w_int8_per_tensor_a_int8_per_tensor", bad, progress=False)


def test_static_scheme_without_calibration_data():
    with pytest.raises(gq.CalibrationError, match="calibration data"):
        gq.quantize(tiny_model("llama"), "w_int8_per_tensor_a_int8_per_tensor", None, progress=False)


def test_nan_activations_are_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(gq.NonFiniteError, match="non-finite weights.*up_proj"):
        gq.quantize(model, "w_int8_per_tensor_a_int8_per_tensor", _calib(), progress=False)


def test_model_quantizer_and_user_model_untouched():
    model = tiny_model("mistral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = gq.ModelQuantizer(preset("w_int8_per_channel_a_int8_per_token")).quantize_model(model, _calib())
    assert isinstance(qm, gq.QuantizedModel) and isinstance(qm, torch.nn.Module)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert qm(input_ids=_ids((1, 5))).logits.shape == (1, 5, 128)
    assert qm.quant_config.global_quant_config.input_tensors.is_dynamic


@pytest.mark.parametrize("arch", ["opt", "phi3", "gemma", "bert"])
def test_other_architectures_quantize(arch):
    model = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = gq.quantize(model, dataclasses.replace(preset("w_int8_per_channel_a_int8_per_token"),
                                                    pre_quant_opt_config=[QuaRotConfig()]), _calib(), progress=False)
    ids = _ids()
    key = "last_hidden_state" if arch == "bert" else "logits"
    ref = getattr(model(input_ids=ids), key)
    assert relative_error(ref, getattr(qm(input_ids=ids), key)) < 0.2


def test_quantized_graph_exports_again():
    qm = gq.quantize(tiny_model("llama"), "w_int8_per_channel_a_int8_per_token", _calib(), progress=False)
    ids = _ids((2, 8))
    ep = torch.export.export(qm.gm, (), {"input_ids": ids, "use_cache": False}, strict=False)
    assert torch.equal(ep.module()(input_ids=ids, use_cache=False).logits, qm(input_ids=ids).logits)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.graphquant.dequantize.default in targets


def test_config_object_required():
    with pytest.raises(gq.ConfigError, match="Config"):
        gq.quantize(tiny_model("llama"), {"weight": "int8"}, _calib())


def test_w4a8_with_dict_batches():
    cfg = Config(global_quant_config=QuantizationConfig(
        weight=QuantizationSpec(dtype="int4", qscheme="per_group", group_size=32),
        input_tensors=QuantizationSpec(dtype="int8", qscheme="per_token")))
    calib = [{"input_ids": b} for b in _calib()]
    qm = gq.quantize(tiny_model("llama"), cfg, calib, progress=False)
    assert _roles(qm)["input"] == 9


def test_smoothquant_accepted_as_algorithm_too():
    from graphquant.config import SmoothQuantConfig

    cfg = dataclasses.replace(preset("w_int8_per_tensor_a_int8_per_tensor"), algo_config=[SmoothQuantConfig()])
    qm = gq.quantize(tiny_model("llama"), cfg, _calib(), progress=False)
    assert any(e["action"] == "smooth" for e in qm.log)
