"""Config: validation messages, defaults, presets, JSON round trip, op strings, precedence."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from graphquant.config import (AlgoConfig, AutoSmoothQuantConfig, AWQConfig, Config, Dtype, GPTQConfig,
                               QSchemeType, QuantizationConfig, QuantizationMode, QuantizationSpec,
                               QuaRotConfig, RotationConfig, RoundType, ScaleType, SmoothQuantConfig,
                               list_presets, preset, with_kv_cache)
from graphquant.errors import ConfigError
from graphquant.quant.observers import (PerBlockMXObserver, PerChannelMinMaxObserver, PerGroupMinMaxObserver,
                                        PerTensorMinMaxObserver, PerTensorMSEObserver,
                                        PerTensorPercentileObserver, PlaceholderObserver)

INT8 = QuantizationSpec(Dtype.int8)


# --------------------------------------------------------------------------- QuantizationSpec
def test_spec_defaults():
    s = QuantizationSpec(Dtype.int8)
    assert (s.qscheme, s.is_dynamic, s.symmetric, s.scale_type, s.round_method) == (
        QSchemeType.per_tensor, False, True, ScaleType.float, RoundType.half_even)
    assert s.observer_cls is PerTensorMinMaxObserver and s.ch_axis is None and s.bits == 8
    assert QuantizationSpec(Dtype.uint4).symmetric is False
    t = QuantizationSpec(Dtype.int8, qscheme=QSchemeType.per_token)
    assert t.is_dynamic and t.observer_cls is PlaceholderObserver
    c = QuantizationSpec(Dtype.int8, qscheme="per_channel")
    assert c.ch_axis == 0 and c.observer_cls is PerChannelMinMaxObserver
    g = QuantizationSpec(Dtype.uint4, qscheme="per_group", group_size=128)
    assert g.ch_axis == -1 and g.observer_cls is PerGroupMinMaxObserver
    m = QuantizationSpec(Dtype.mx)
    assert (m.qscheme, m.group_size, m.mx_element_dtype, m.scale_type) == (
        QSchemeType.per_group, 32, Dtype.fp8_e4m3, ScaleType.pof2)
    assert m.observer_cls is PerBlockMXObserver and m.bits == 8 and m.is_float_format
    assert QuantizationSpec(Dtype.mx, mx_element_dtype="fp4").bits == 4
    assert not QuantizationSpec(Dtype.mx, mx_element_dtype="int8").is_float_format
    assert QuantizationSpec(Dtype.int8, is_dynamic=True).observer_cls is PlaceholderObserver
    b = QuantizationSpec(Dtype.bfloat16)
    assert b.is_cast and b.qscheme is None and b.observer_cls is PlaceholderObserver and b.bits == 16


def test_spec_accepts_strings_and_observer_names():
    s = QuantizationSpec("int8", observer_cls="PerTensorMSEObserver", qscheme="per_tensor",
                         round_method="round")
    assert s.dtype is Dtype.int8 and s.observer_cls is PerTensorMSEObserver and s.round_method is RoundType.round
    assert s == QuantizationSpec(Dtype.int8, observer_cls=PerTensorMSEObserver, round_method=RoundType.round)


@pytest.mark.parametrize("kwargs,fix", [
    (dict(dtype=Dtype.uint4, qscheme="per_group"), "group_size=128"),
    (dict(dtype=Dtype.fp8_e4m3, symmetric=False), "symmetric=True"),
    (dict(dtype=Dtype.int8, qscheme="per_token", is_dynamic=False), "is_dynamic=True"),
    (dict(dtype=Dtype.int4, qscheme="per_group", group_size=0), "positive"),
    (dict(dtype=Dtype.int4, qscheme="per_group", group_size=-32), "positive"),
    (dict(dtype=Dtype.int8, observer_cls=PerChannelMinMaxObserver), "leave observer_cls unset"),
    (dict(dtype=Dtype.int8, qscheme="per_channel", observer_cls=PerTensorMinMaxObserver),
     "leave observer_cls unset"),
    (dict(dtype=Dtype.int8, observer_cls=PlaceholderObserver), "is_dynamic=True"),
    (dict(dtype=Dtype.int8, qscheme="per_token", observer_cls=PerTensorMinMaxObserver), "observer_cls unset"),
    (dict(dtype=Dtype.int8, qscheme="per_group", group_size=32, observer_cls=PerBlockMXObserver), "Dtype.mx"),
    (dict(dtype=Dtype.bfloat16, qscheme="per_tensor"), "leave it unset"),
    (dict(dtype=Dtype.bfloat16, observer_cls=PerTensorMinMaxObserver), "PlaceholderObserver"),
    (dict(dtype=Dtype.int8, group_size=64), "qscheme=per_group"),
    (dict(dtype=Dtype.int8, ch_axis=1), "remove it"),
    (dict(dtype=Dtype.int8, mx_element_dtype="fp4"), "Dtype.mx"),
    (dict(dtype=Dtype.mx, mx_element_dtype="uint4"), "mx_element_dtype"),
    (dict(dtype=Dtype.mx, qscheme="per_tensor"), "per_group"),
    (dict(dtype=Dtype.mx, scale_type="float"), "pof2"),
    (dict(dtype=Dtype.mx, symmetric=False), "symmetric"),
    (dict(dtype="int7"), "int8"),
    (dict(dtype=Dtype.int8, qscheme="per_row"), "per_token"),
    (dict(dtype=Dtype.int8, observer_cls="MinMax"), "PerTensorMinMaxObserver"),
    (dict(dtype=Dtype.int8, observer_cls=object), "ObserverBase"),
    (dict(dtype=Dtype.int8, is_dynamic="yes"), "True, False or None"),
])
def test_spec_validation_messages(kwargs, fix):
    with pytest.raises(ConfigError, match=None) as e:
        QuantizationSpec(**kwargs)
    assert fix in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_weight_specs_must_be_static():
    with pytest.raises(ConfigError, match="is_dynamic=False"):
        QuantizationConfig(weight=QuantizationSpec(Dtype.int8, is_dynamic=True))
    with pytest.raises(ConfigError, match="per_channel"):
        QuantizationConfig(weight=QuantizationSpec(Dtype.int8, qscheme="per_token"))
    with pytest.raises(ConfigError, match="QuantizationSpec"):
        QuantizationConfig(weight="int8")


def test_spec_evolve_rederives_defaults():
    s = QuantizationSpec(Dtype.int8, qscheme="per_channel")
    g = s.evolve(qscheme="per_group", group_size=64)
    assert g.observer_cls is PerGroupMinMaxObserver and g.ch_axis == -1 and g.group_size == 64
    assert s.evolve() == s
    m = QuantizationSpec(Dtype.int8, observer_cls=PerTensorMSEObserver)
    assert m.evolve(round_method="floor").observer_cls is PerTensorMSEObserver  # explicit choice kept
    # dataclasses.replace keeps the old observer and so fails with a clear message
    with pytest.raises(ConfigError, match="observer"):
        dataclasses.replace(s, qscheme="per_group", group_size=64)


ALL_SPECS = ([QuantizationSpec(d, qscheme=q, symmetric=sym, scale_type=st_, round_method=r)
              for d in (Dtype.int8, Dtype.uint8, Dtype.int4, Dtype.uint4, Dtype.int2)
              for q in ("per_tensor", "per_channel") for sym in (True, False)
              for st_ in ("float", "pof2") for r in ("round", "floor", "half_even")]
             + [QuantizationSpec(d, qscheme=q, is_dynamic=True) for d in (Dtype.fp8_e4m3, Dtype.fp8_e5m2,
                                                                        Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4)
                for q in ("per_tensor", "per_token")]
             + [QuantizationSpec(Dtype.int4, qscheme="per_group", group_size=g, ch_axis=a)
                for g in (32, 128) for a in (-1, 1)]
             + [QuantizationSpec(Dtype.mx, mx_element_dtype=e, group_size=g, is_dynamic=dyn)
                for e in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4", "int8")
                for g in (32, 16) for dyn in (False, True)]
             + [QuantizationSpec(Dtype.bfloat16), QuantizationSpec(Dtype.float16)])


@settings(max_examples=100, deadline=None)
@given(spec=st.sampled_from(ALL_SPECS))
def test_op_str_round_trip(spec):
    s = spec.to_op_str()
    assert QuantizationSpec.from_op_str(s) == spec  # default observers throughout
    assert QuantizationSpec.from_op_str(s).to_op_str() == s
    assert QuantizationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_op_str_format_and_cache():
    assert INT8.to_op_str() == "int8:per_tensor:sym:static:float:half_even"
    assert QuantizationSpec(Dtype.uint4, qscheme="per_group", group_size=128).to_op_str() == \
        "uint4:per_group:asym:static:float:half_even:axis=-1:group=128"
    assert QuantizationSpec(Dtype.mx, mx_element_dtype="fp4", is_dynamic=True).to_op_str() == \
        "mx:per_group:sym:dynamic:pof2:half_even:axis=-1:group=32:elem=fp4"
    assert QuantizationSpec.from_op_str("int8:per_token:sym:dynamic:float:half_even") is \
        QuantizationSpec.from_op_str("int8:per_token:sym:dynamic:float:half_even")
    for bad in ("int8:per_tensor", "int8:per_tensor:yes:static:float:half_even",
                "int8:per_channel:sym:static:float:half_even:axis=x", "int8:per_tensor:sym:static:float:half_even:foo=1"):
        with pytest.raises(ConfigError, match="spec string"):
            QuantizationSpec.from_op_str(bad)


def test_observer_classes_reexported_from_config():
    import graphquant.config as C
    assert C.PerTensorPercentileObserver is PerTensorPercentileObserver


# --------------------------------------------------------------------------- algorithm configs
def test_algo_config_defaults_and_validation():
    assert SmoothQuantConfig().alpha == 0.5 and SmoothQuantConfig(0.85).alpha == 0.85
    a = AutoSmoothQuantConfig()
    assert a.alphas[0] == 0.0 and a.alphas[-1] == 1.0 and len(a.alphas) == 21
    assert QuaRotConfig(online_had=False).rotations == ("R1", "R2")
    assert QuaRotConfig().rotations == ("R1", "R2", "R3", "R4")
    assert GPTQConfig().block_size == 128 and AWQConfig().grid == 20 and RotationConfig().name == "rotation"
    for bad, fix in [(lambda: SmoothQuantConfig(alpha=1.5), "[0, 1]"),
                     (lambda: SmoothQuantConfig(scale_clamp_min=0), "> 0"),
                     (lambda: AutoSmoothQuantConfig(alphas=()), "non-empty"),
                     (lambda: QuaRotConfig(on_unsupported_size="warn"), "'skip' or 'error'"),
                     (lambda: QuaRotConfig(r1=False, r2=False, r3=False, r4=False), "enable at least one"),
                     (lambda: AWQConfig(grid=0), ">= 1"),
                     (lambda: GPTQConfig(damp_percent=0), "(0, 1]"),
                     (lambda: GPTQConfig(block_size=0), ">= 1"),
                     (lambda: SmoothQuantConfig(name="awq"), "'smoothquant'")]:
        with pytest.raises(ConfigError) as e:
            bad()
        assert fix in str(e.value)


@pytest.mark.parametrize("algo", [SmoothQuantConfig(alpha=0.85, fc_fc=True), AutoSmoothQuantConfig(alphas=(0.3, 0.6)),
                                  RotationConfig(random=True, seed=3), QuaRotConfig(online_had=False),
                                  AWQConfig(grid=10), GPTQConfig(desc_act=False, block_size=64)])
def test_algo_config_dict_round_trip(algo):
    d = json.loads(json.dumps(algo.to_dict()))
    assert d["name"] == algo.name and AlgoConfig.from_dict(d) == algo


def test_algo_placement_is_checked():
    with pytest.raises(ConfigError, match="pre_quant_opt_config"):
        Config(QuantizationConfig(weight=INT8), algo_config=RotationConfig())
    with pytest.raises(ConfigError, match="algo_config"):
        Config(QuantizationConfig(weight=INT8), pre_quant_opt_config=[GPTQConfig()])
    c = Config(QuantizationConfig(weight=INT8), algo_config=GPTQConfig(), pre_quant_opt_config=QuaRotConfig())
    assert c.algo_config == [GPTQConfig()] and c.pre_quant_opt_config == [QuaRotConfig()]
    assert Config(QuantizationConfig()).algo_config is None


# --------------------------------------------------------------------------- Config and JSON
def _full_config() -> Config:
    kv = QuantizationSpec(Dtype.fp8_e4m3)
    return Config(
        global_quant_config=QuantizationConfig(input_tensors=INT8, weight=QuantizationSpec(Dtype.int8, qscheme="per_channel")),
        layer_type_quant_config={torch.nn.Linear: QuantizationConfig(weight=INT8), "Conv1D": QuantizationConfig(weight=INT8)},
        layer_quant_config={"*k_proj": QuantizationConfig(input_tensors=INT8, weight=INT8, output_tensors=kv)},
        exclude=["*lm_head"],
        algo_config=[AWQConfig(scaling_layers=[{"prev_op": "input_layernorm", "layers": ["self_attn.q_proj"]}])],
        pre_quant_opt_config=[SmoothQuantConfig(alpha=0.85, fc_fc=True), QuaRotConfig(r4=False, on_unsupported_size="error")],
        quant_mode=QuantizationMode.fx_graph_mode,
        kv_cache_quant_config=QuantizationSpec(Dtype.int8, qscheme="per_token"),
        log_severity_level=2)


def test_json_round_trip_full_config():
    c = _full_config()
    s = c.to_json()
    c2 = Config.from_json(s)
    assert c2 == c
    assert torch.nn.Linear in c2.layer_type_quant_config
    assert json.loads(s)["global_quant_config"]["weight"]["observer_cls"] == "PerChannelMinMaxObserver"
    assert Config.from_json(c2.to_json(indent=None)) == c


@pytest.mark.parametrize("name", list(list_presets()))
def test_every_preset_constructs_and_round_trips(name):
    c = preset(name)
    assert isinstance(c, Config) and c.exclude == ["*lm_head"]  # as Quark's CLI: lm_head stays float
    assert Config.from_json(c.to_json()) == c
    assert preset(name) is not c and preset(name) == c


def test_preset_contents():
    c = preset("w_int8_per_tensor_a_int8_per_tensor")
    g = c.global_quant_config
    assert g.weight == INT8 and g.input_tensors == INT8 and c.kv_cache_quant_config is None
    g = preset("w_int8_per_channel_a_int8_per_token").global_quant_config
    assert g.weight.qscheme == QSchemeType.per_channel and g.weight.ch_axis == 0
    assert g.input_tensors.qscheme == QSchemeType.per_token and g.input_tensors.is_dynamic
    assert preset("w_int8_per_channel_a_int8_per_tensor_dynamic").global_quant_config.input_tensors.is_dynamic
    assert not preset("w_int8_per_channel_a_int8_per_tensor").global_quant_config.input_tensors.is_dynamic
    kv = preset("w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token").kv_cache_quant_config
    assert kv.qscheme == QSchemeType.per_token and kv.dtype == Dtype.int8
    kv = preset("w_int8_per_tensor_a_int8_per_tensor_kv_cache_int8_per_tensor").kv_cache_quant_config
    assert kv == INT8
    assert preset("w_int8_per_tensor").global_quant_config.input_tensors is None
    assert preset("w_int8_a_int8_per_tensor_sym") == preset("w_int8_per_tensor_a_int8_per_tensor")
    g = preset("w_uint4_per_group_asym").global_quant_config
    assert g.weight.group_size == 128 and not g.weight.symmetric and g.input_tensors is None
    g = preset("w_fp8_a_fp8").global_quant_config
    assert g.weight.dtype == Dtype.fp8_e4m3 and not g.input_tensors.is_dynamic
    g = preset("w_mxfp4_a_mxfp4").global_quant_config
    assert g.weight.mx_element_dtype == Dtype.fp4 and g.input_tensors.is_dynamic and g.weight.group_size == 32
    g = preset("w_int4_a_int4_per_token").global_quant_config
    assert g.weight.dtype == Dtype.int4 and g.input_tensors.dtype == Dtype.int4
    assert len([n for n in list_presets() if "a_int8" in n and n.startswith("w_int8_per_")]) == 8


def test_unknown_preset_lists_names_and_close_match():
    with pytest.raises(ConfigError) as e:
        preset("w_int8_per_tensr_a_int8_per_tensor")
    msg = str(e.value)
    assert "Did you mean 'w_int8_per_tensor_a_int8_per_tensor'" in msg and "w_fp8_a_fp8" in msg


def test_with_kv_cache():
    base = preset("w_int8_per_tensor_a_int8_per_tensor")
    c = with_kv_cache(base, "fp8")
    assert c.kv_cache_quant_config == QuantizationSpec(Dtype.fp8_e4m3) and base.kv_cache_quant_config is None
    c = with_kv_cache(base, "int8", "per_token")
    assert c.kv_cache_quant_config.is_dynamic and c.global_quant_config == base.global_quant_config
    assert with_kv_cache(c, None).kv_cache_quant_config is None
    with pytest.raises(ConfigError, match="'int8' or 'fp8'"):
        with_kv_cache(base, "int4")


def test_config_validation():
    with pytest.raises(ConfigError, match="list of FQN globs"):
        Config(QuantizationConfig(), exclude=[3])
    assert Config(QuantizationConfig(), exclude="*lm_head").exclude == ["*lm_head"]
    with pytest.raises(ConfigError, match="QuantizationConfig"):
        Config(QuantizationConfig(), layer_quant_config={"*q_proj": INT8})
    with pytest.raises(ConfigError, match="module class"):
        Config(QuantizationConfig(), layer_type_quant_config={3: QuantizationConfig()})
    with pytest.raises(ConfigError, match="QuantizationMode"):
        Config(QuantizationConfig(), quant_mode="graph")
    with pytest.raises(ConfigError, match="unknown Config field"):
        Config.from_json('{"global_quant_config": {}, "exclud": []}')
    with pytest.raises(ConfigError, match="unknown algorithm"):
        Config.from_json('{"global_quant_config": {}, "pre_quant_opt_config": [{"name": "spin"}]}')
    with pytest.raises(ConfigError, match="does not parse"):
        Config.from_json("{")


# --------------------------------------------------------------------------- resolve precedence
def test_resolve_precedence():
    glob = QuantizationConfig(weight=INT8)
    typ = QuantizationConfig(weight=QuantizationSpec(Dtype.int4))
    any_proj = QuantizationConfig(weight=QuantizationSpec(Dtype.uint8))
    k_proj = QuantizationConfig(weight=QuantizationSpec(Dtype.fp8_e4m3))
    layer0_k = QuantizationConfig(weight=QuantizationSpec(Dtype.fp8_e5m2))
    exact = QuantizationConfig(weight=QuantizationSpec(Dtype.int2))
    c = Config(glob,
               layer_type_quant_config={torch.nn.Linear: typ},
               layer_quant_config={"*_proj": any_proj, "*.k_proj": k_proj,
                                   "model.layers.0.*k_proj": layer0_k,
                                   "model.layers.1.self_attn.k_proj*": k_proj,
                                   "model.layers.1.self_attn.k_proj": exact},
               exclude=["*lm_head", "*layers.3.*"])
    assert c.resolve("lm_head", "Linear") is None                                  # exclude
    assert c.resolve("model.layers.3.self_attn.k_proj", "Linear") is None         # exclude beats layer
    assert c.resolve("model.layers.2.self_attn.k_proj", "Linear") is k_proj      # most specific glob
    assert c.resolve("model.layers.2.mlp.up_proj", "Linear") is any_proj
    assert c.resolve("model.layers.0.self_attn.k_proj", "Linear") is layer0_k
    assert c.resolve("model.layers.1.self_attn.k_proj", "Linear") is exact       # exact name first
    assert c.resolve("model.layers.2.mlp.fc", "Linear") is typ                     # layer type
    assert c.resolve("model.layers.2.mlp.fc", torch.nn.Linear) is typ
    assert c.resolve("model.layers.2.mlp.fc", "torch.nn.modules.linear.Linear") is typ
    assert c.resolve("model.layers.2.mlp.conv", "Conv1d") is glob                  # global
    # equal specificity: the first listed wins
    c2 = Config(glob, layer_quant_config={"*q_proj": any_proj, "*k_proj": k_proj, "*_proj": exact,
                                          "*.?_proj": layer0_k})
    assert c2.resolve("a.q_proj", "Linear") is any_proj
    # a string type key
    c3 = Config(glob, layer_type_quant_config={"Linear": typ})
    assert c3.resolve("x", torch.nn.Linear) is typ
    # an empty QuantizationConfig quantizes nothing
    c4 = Config(QuantizationConfig(), layer_quant_config={"*q_proj": glob})
    assert c4.resolve("a.v_proj", "Linear") is None and c4.resolve("a.q_proj", "Linear") is glob


def test_unmatched_exclude():
    c = Config(QuantizationConfig(weight=INT8), exclude=["*lm_head", "*layers.9.*"])
    assert c.unmatched_exclude(["lm_head", "model.layers.0.mlp.down_proj"]) == ["*layers.9.*"]
    assert c.is_excluded("lm_head") and not c.is_excluded("model.lm_head.x")


def test_preset_group_size_and_pre_quant_overrides():
    cfg = preset("w_int4_per_group_sym", group_size=32, pre_quant_opt_config=[QuaRotConfig()])
    assert cfg.global_quant_config.weight.group_size == 32
    assert [type(p) for p in cfg.pre_quant_opt_config] == [QuaRotConfig]
    assert preset("w_int4_per_group_sym").global_quant_config.weight.group_size == 128  # fresh each call
    with pytest.raises(ConfigError, match="no per-group weights"):
        preset("w_int8_per_channel_a_int8_per_token", group_size=64)
