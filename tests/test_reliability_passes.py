"""Issue 12, items 2, 5, 7 and the pass/calibration usability fixes, on tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import graphquant as gq
from graphquant.config import QuaRotConfig, preset
from graphquant.models.tiny import tiny_model

SCHEME = "w_int8_per_tensor_a_int8_per_tensor"


def _calib(n=2, seq=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, seq), generator=g) for _ in range(n)]


def _llama():
    return tiny_model("llama", num_layers=1)


def _triple_down_proj(ctx):
    for target, p in ctx.gm.named_parameters():
        if target.endswith("down_proj.weight"):
            with torch.no_grad():
                p.mul_(3)
    ctx.record(action="scaled down_proj by 3")


# --- item 2: user passes are checked by default ------------------------------------------------------
@pytest.mark.parametrize("stage", [None, "rotate"])
def test_user_pass_that_changes_the_function_is_caught(stage):
    with gq.pass_scope():
        gq.register_pass("triple", stage=stage)(_triple_down_proj)
        with pytest.raises(gq.EquivalenceError, match="'triple'.*check=False"):
            gq.quantize(_llama(), SCHEME, _calib(), progress=False)


def test_check_false_opts_out_and_checked_passes_are_reported():
    with gq.pass_scope():
        gq.register_pass("triple", check=False)(_triple_down_proj)
        gq.register_pass("noop")(lambda ctx: None)
        q = gq.quantize(_llama(), SCHEME, _calib(), progress=False)
    assert "noop" in q.equivalence and q.equivalence["noop"] < 1e-6
    assert "triple" not in q.equivalence
    assert any(e["pass"] == "triple" for e in q.log)


def test_pass_errors_name_the_pass_and_duplicates_raise():
    def boom(ctx):
        raise KeyError("oops")

    with gq.pass_scope():
        gq.register_pass("boom")(boom)
        with pytest.raises(gq.PassError, match="pass 'boom' failed.*KeyError"):
            gq.rewrite(_llama(), [])
        with pytest.raises(gq.PassError, match="already registered"):
            gq.register_pass("boom")(lambda ctx: None)
        gq.register_pass("boom", replace=True)(lambda ctx: None)
        gq.rewrite(_llama(), [])


def test_scoped_passes_do_not_leak():
    with gq.pass_scope():
        @gq.register_pass("scoped_boom")
        def scoped_boom(ctx):
            raise RuntimeError("should not run")

        # passes=[...] runs exactly the listed user passes
        gq.rewrite(_llama(), [], passes=[])
    assert "scoped_boom" not in gq.passes.registered_passes()
    gq.rewrite(_llama(), [])  # the scope ended: later calls do not see the pass
    with pytest.raises(gq.PassError, match="not registered"):
        gq.rewrite(_llama(), [], passes=["scoped_boom"])


# --- item 5: inplace -------------------------------------------------------------------------------------
def test_inplace_failure_restores_the_model():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with gq.pass_scope():
        @gq.register_pass("fail_late", after="rotate", check=False)
        def fail_late(ctx):
            raise RuntimeError("late failure")

        with pytest.raises(gq.PassError, match="fail_late"):
            gq.quantize(model, dataclasses.replace(preset(SCHEME), pre_quant_opt_config=[QuaRotConfig()]),
                        _calib(), inplace=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inplace_success_never_leaves_a_silently_different_model():
    ids = _calib()[0]
    model = _llama()
    ref = model(input_ids=ids).logits
    q = gq.quantize(model, dataclasses.replace(preset(SCHEME), pre_quant_opt_config=[QuaRotConfig()]), _calib(),
                    inplace=True, progress=False)
    with pytest.raises(gq.GraphQuantError, match="inplace=True.*returned model"):
        model(input_ids=ids)
    assert torch.isfinite(q(input_ids=ids).logits).all()
    # offline-only rewrites keep the eager model's function: it stays usable
    model2 = _llama()
    gq.rewrite(model2, [QuaRotConfig(r3=False, r4=False)], inplace=True)
    assert torch.allclose(model2(input_ids=ids).logits, ref, atol=1e-4)


def test_quantizing_a_graphquant_model_is_a_clear_error():
    f = gq.rewrite(_llama(), [])
    with pytest.raises(gq.UnsupportedModelError, match="already a graphquant GraphModel.*pre_quant_opt_config"):
        gq.quantize(f, SCHEME, _calib(), progress=False)


# --- item 7: non-finite weights and outputs --------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_stop_a_dynamic_scheme(value):
    model = _llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[3, 3] = value
    with pytest.raises(gq.NonFiniteError, match="o_proj.weight"):
        gq.quantize(model, "w_int8_per_channel_a_int8_per_token", None, progress=False)


def test_non_finite_output_is_detected():
    model = _llama()
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)  # finite weights, overflowing logits
    with pytest.raises(gq.NonFiniteError, match="output is not finite"):
        gq.quantize(model, "w_int8_per_channel_a_int8_per_token", None, progress=False, check=False)


# --- calibration with padding masks (Quark's DataLoader of dicts) ----------------------------------------
def _padded_loader(seq=12, lengths=(12, 7, 9, 4)):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths:
        ids = torch.randint(0, 128, (seq,), generator=g)
        mask = torch.zeros(seq, dtype=torch.long)
        mask[:length] = 1
        rows.append({"input_ids": ids, "attention_mask": mask})
    return rows, DataLoader(rows, batch_size=2)


def test_quark_dataloader_of_padded_dicts_just_works():
    rows, loader = _padded_loader()
    q = gq.ModelQuantizer(preset(SCHEME)).quantize_model(_llama(), loader, progress=False)
    # the same tokens without padding, one sequence per batch: identical activation scales
    unpadded = [r["input_ids"][: int(r["attention_mask"].sum())][None] for r in rows]
    ref = gq.quantize(_llama(), SCHEME, unpadded, progress=False)
    scales = {k: v for k, v in q.gm.named_buffers() if k.endswith("_scale") and "weight" not in k}
    ref_scales = dict(ref.gm.named_buffers())
    assert scales
    for k, v in scales.items():
        assert torch.allclose(v, ref_scales[k], rtol=1e-5), k
    # the quantized model takes the mask too, and masked positions do not change valid logits
    batch = next(iter(loader))
    out = q(**batch).logits
    assert out.shape == (2, 12, 128) and torch.isfinite(out).all()


def test_mask_on_a_graph_captured_without_it():
    q = gq.quantize(_llama(), SCHEME, _calib(), progress=False)
    ids = _calib()[0]
    ones = torch.ones_like(ids)
    assert torch.equal(q(input_ids=ids, attention_mask=ones).logits, q(input_ids=ids).logits)
    ones[0, -3:] = 0
    with pytest.raises(gq.CaptureError, match="attention_mask.*calibration batches"):
        q(input_ids=ids, attention_mask=ones)


def test_int8_input_ids_message():
    with pytest.raises(gq.CalibrationError, match="ids.long()"):
        gq.quantize(_llama(), SCHEME, [torch.randint(0, 100, (2, 8)).to(torch.int8)], progress=False)


@pytest.mark.parametrize("exclude", [["*"], ["*proj", "*lm_head"]])
def test_exclude_everything_warns(exclude):
    cfg = dataclasses.replace(preset("w_int8_per_channel_a_int8_per_token"), exclude=exclude)
    with pytest.warns(UserWarning, match="nothing will be quantized: every Linear matches exclude"):
        gq.quantize(_llama(), cfg, None, progress=False)


def test_log_severity_level_is_honoured():
    import logging

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("graphquant")
    logger.addHandler(handler)
    try:
        cfg = dataclasses.replace(preset("w_int8_per_channel_a_int8_per_token"), log_severity_level=1)
        gq.quantize(_llama(), cfg, None, progress=False)
        text = "\n".join(r.getMessage() for r in records)
        assert "capturing LlamaForCausalLM" in text and "running passes" in text and "quantized in" in text
        records.clear()
        gq.quantize(_llama(), dataclasses.replace(cfg, log_severity_level=3), None, progress=False)
        assert not [r for r in records if r.levelno < logging.ERROR]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


# --- QuaRot on a head_dim without a Hadamard matrix ---------------------------------------------------
def _head_dim_30():
    return tiny_model("llama", num_layers=1, hidden_size=90, num_attention_heads=3, num_key_value_heads=1,
                      head_dim=30, intermediate_size=128)


def test_quarot_skips_r2_r3_on_head_dim_30():
    model = _head_dim_30()
    with pytest.warns(UserWarning, match="R2 skipped.*head_dim 30"):
        f = gq.rewrite(model, [QuaRotConfig()])
    assert f.plan.r2 is None and f.plan.r3 is None and f.plan.r1 is not None
    assert any(n.startswith("R2 skipped") for n in f.plan.notes)
    assert any(n.startswith("R3 skipped") for n in f.plan.notes)
    ids = _calib()[0]
    assert torch.allclose(f(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)
    with pytest.raises(gq.ConfigError, match="R2 skipped.*on_unsupported_size='skip'"):
        gq.rewrite(model, [QuaRotConfig(on_unsupported_size="error")])


def test_gptq_hessians_ignore_padding():
    from graphquant.config import GPTQConfig

    rows, loader = _padded_loader(96, (96, 50, 70, 30))
    cfg = dataclasses.replace(preset("w_int4_per_channel_sym"), algo_config=[GPTQConfig()])
    padded = gq.quantize(_llama(), cfg, loader, progress=False)
    unpadded = [r["input_ids"][: int(r["attention_mask"].sum())][None] for r in rows]
    ref = gq.quantize(_llama(), cfg, unpadded, progress=False)
    ref_q = dict(ref.gm.named_buffers())
    codes = {k: v for k, v in padded.gm.named_buffers() if k.endswith("weight_q")}
    assert codes
    same = sum(int((v == ref_q[k]).sum()) for k, v in codes.items()) / sum(v.numel() for v in codes.values())
    assert same > 0.999, same


def test_explicit_example_inputs_with_a_mask_need_no_use_cache():
    """Before: example_inputs={"input_ids", "attention_mask"} failed with a CaptureError about DynamicCache."""
    ids = _calib()[0]
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    model = _llama()
    f = gq.rewrite(model, [], example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(f(input_ids=ids, attention_mask=mask).logits[mask.bool()], ref[mask.bool()], atol=1e-5)


def test_calibration_longer_than_the_context_warns():
    model = tiny_model("llama", num_layers=1, max_position_embeddings=16)
    with pytest.warns(UserWarning, match="longer than the model's context \\(16 positions\\)"):
        gq.quantize(model, SCHEME, [torch.randint(0, 128, (1, 20))], progress=False)
