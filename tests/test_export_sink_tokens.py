"""Sink-token quantizers (``SinkTokenConfig``) through the emitters: the HF write-back and a saved
checkpoint reproduce the graph's numbers, decode steps use the static scale, and the export says
that other consumers apply the static scale to every token."""
import dataclasses
import json

import torch

import graphquant as gq
from graphquant.config import QuaRotConfig, SinkTokenConfig, preset
from graphquant.models.tiny import tiny_model


def _model_and_calib():
    torch.manual_seed(0)
    model = tiny_model("llama")
    with torch.no_grad():  # token 0 gets a massive embedding, as an attention sink does
        model.model.embed_tokens.weight[0, :4] *= 300.0
    g = torch.Generator().manual_seed(2)
    calib = []
    for _ in range(3):
        ids = torch.randint(1, 128, (2, 24), generator=g)
        ids[:, 0] = 0
        calib.append(ids)
    return model, calib


def _quantized(kv=False):
    model, calib = _model_and_calib()
    cfg = dataclasses.replace(preset("w_int8_per_tensor_a_int8_per_tensor"), pre_quant_opt_config=[QuaRotConfig()],
                              algo_config=[SinkTokenConfig()])
    if kv:
        cfg = gq.config.with_kv_cache(cfg, "fp8_e4m3")
    return gq.quantize(model, cfg, calib, progress=False), calib


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_write_back_and_round_trip_keep_sink_tokens(tmp_path):
    qm, calib = _quantized(kv=True)
    ids = calib[0]
    ref = _logits(qm, ids)
    hf = qm.to_hf()
    sinks = [m for m in hf.modules() if getattr(m, "sink_tokens", 0)]
    assert sinks, "no quantizer of the write-back carries the sink-token rule"
    assert torch.allclose(_logits(hf, ids), ref, rtol=0, atol=1e-5 * ref.abs().max())
    marker = qm.save_pretrained(tmp_path / "q")
    assert any("sink tokens" in c for c in marker["caveats"])
    saved = json.loads((tmp_path / "q" / "graphquant_export.json").read_text())
    assert any(k.endswith("_sink") for s in saved["specs"].values() for k in s)
    loaded = gq.load(tmp_path / "q")
    assert len([m for m in loaded.modules() if getattr(m, "sink_tokens", 0)]) == len(sinks)
    assert torch.equal(_logits(loaded, ids), _logits(hf, ids))


def test_sink_rule_changes_the_prefill_and_not_a_decode_step():
    qm, calib = _quantized()
    hf = qm.to_hf()
    ids = calib[0][:1]
    plain = qm.to_hf()
    for m in plain.modules():  # the same model without the sink rule
        if getattr(m, "sink_tokens", 0):
            m.sink_tokens = 0
    full_sink, full_plain = _logits(hf, ids), _logits(plain, ids)
    model, _ = _model_and_calib()
    fp = _logits(model, ids)
    # the scales were calibrated without the sink token: without the rule it is clipped, with it it is not
    err_sink, err_plain = (full_sink[:, 0] - fp[:, 0]).norm(), (full_plain[:, 0] - fp[:, 0]).norm()
    assert err_sink < 0.8 * err_plain, (err_sink, err_plain)
    # a KV-cached decode step (one new position) quantizes with the static scale in both
    with torch.no_grad():
        out = hf(input_ids=ids[:, :-1], use_cache=True)
        step = hf(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[:, -1], full_sink[:, -1], atol=1e-3 * full_sink.abs().max())
    greedy = hf.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert greedy.shape == (1, 14)
