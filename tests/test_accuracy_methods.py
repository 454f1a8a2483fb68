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


@pytest.mark.parametrize("algo", [None, GPTQConfig(), AWQConfig(grid=4)], ids=["rtn", "gptq", "awq"])
def test_group_size_not_dividing_in_features_runs_rtn_gptq_awq(algo):
    """in_features 64 / 128 with groups of 48: 48+16 and 48+48+32. The stored weight sits on the grid of
    its own scales, and the result stays close to float."""
    from graphquant.passes.gptq import grid_roundtrip_error
    from graphquant.quant.fake_quant import dequantize

    model = tiny_model("llama")
    qm = gq.quantize(model, _w4_g48([algo] if algo else None), _calib(), progress=False)
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
