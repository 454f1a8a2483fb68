"""``graphquant.generation.prepare``: horizontal fusion of q|k|v and gate|up, R3 elision and kernel
layouts keep the model's function (CPU; the CUDA side is in test_generation_gpu.py)."""
from __future__ import annotations

import pytest
import torch

import graphquant as gq
from graphquant import config as C
from graphquant.export.from_graph import ExportError
from graphquant.export.qlinear import QuantLinear
from graphquant.generation import PrepareError, fuse_records, prepare
from graphquant.models.tiny import tiny_model
from test_export_hf import calib, logits, make_config, rel


def _fused_names(model):
    return sorted(n for n, m in model.named_modules() if n.endswith("graphquant_fused"))


def _on_kernels(hf):
    """``hf`` with every graphquant Linear on its kernel backend (as ``prepare`` sets it on CUDA)."""
    for m in hf.modules():
        if isinstance(m, QuantLinear):
            m.backend = "kernel"
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("scheme,group,pre,kv", [
    ("w_int8_per_channel_a_int8_per_token", None, (), None),
    ("w_int8_a_int8_per_tensor_sym", None, (C.SmoothQuantConfig(),), None),   # static, per-tensor weights
    ("w_int4_per_group_sym", 32, (), None),
    ("w_uint4_per_group_asym", 32, (), None),
])
def test_prepare_keeps_logits_and_greedy_tokens(arch, scheme, group, pre, kv):
    model = tiny_model(arch)
    qm = gq.quantize(model, make_config(scheme, group, pre=pre, kv=kv), calib(), progress=False)
    hf = qm.to_hf()
    ids = torch.randint(2, 128, (2, 9))
    ref = logits(hf, ids)
    ref_tokens = hf.generate(input_ids=ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    prepare(hf)
    report = hf.graphquant_prepared
    assert len(report["fused"]) == 2 * hf.config.num_hidden_layers, report
    layer = hf.model.layers[0]
    assert isinstance(layer.self_attn.graphquant_fused, QuantLinear)
    assert isinstance(layer.mlp.graphquant_fused, QuantLinear)
    assert not isinstance(layer.self_attn.q_proj, QuantLinear)
    assert layer.self_attn.graphquant_fused.out_features == sum(
        layer.self_attn.get_submodule(p).stop - layer.self_attn.get_submodule(p).start
        for p in ("q_proj", "k_proj", "v_proj"))
    assert rel(logits(hf, ids), ref) < 1e-5
    assert torch.equal(hf.generate(input_ids=ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0), ref_tokens)


def test_quarot_r3_elided_without_kv_quantizer_and_kept_with_one():
    model = tiny_model("llama")
    qm = gq.quantize(model, make_config("w_int8_per_channel_a_int8_per_token", pre=[C.QuaRotConfig()]), calib(),
                     progress=False)
    hf = qm.to_hf()
    assert hf.model.layers[0].self_attn.graphquant_online.r3
    ids = torch.randint(2, 128, (1, 10))
    ref = logits(hf, ids)
    tokens = hf.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    prepare(hf)
    assert len(hf.graphquant_prepared["r3_elided"]) == hf.config.num_hidden_layers
    assert not hasattr(hf.model.layers[0].self_attn, "graphquant_online")
    assert rel(logits(hf, ids), ref) < 1e-4  # only the rounding of the rotated Q and K differs
    assert torch.equal(hf.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0), tokens)

    qm = gq.quantize(model, make_config("w_int8_per_channel_a_int8_per_token", pre=[C.QuaRotConfig()], kv="fp8"),
                     calib(), progress=False)
    hf = qm.to_hf()
    ref = logits(hf, ids)
    prepare(hf)
    assert hf.graphquant_prepared["r3_elided"] == []
    assert hf.model.layers[0].self_attn.graphquant_online.r3
    assert rel(logits(hf, ids), ref) < 1e-5


def test_fuse_records_refuses_different_input_quantizers_and_converts_per_tensor_scales():
    model = tiny_model("llama")
    qm = gq.quantize(model, make_config("w_int8_a_int8_per_tensor_sym"), calib(), progress=False)
    hf = qm.to_hf()
    attn = hf.model.layers[0].self_attn
    recs = [attn.q_proj.record(), attn.k_proj.record(), attn.v_proj.record()]
    fused = fuse_records(recs)
    assert fused is not None and fused.shape[0] == sum(r.shape[0] for r in recs)
    if not all(torch.equal(r.weight_scale, recs[0].weight_scale) for r in recs):
        assert fused.weight_spec.qscheme.value == "per_channel"
    mlp = hf.model.layers[0].mlp
    assert fuse_records([attn.q_proj.record(), mlp.gate_proj.record()]) is None  # other input, other scale


def test_prepared_model_cannot_be_saved_and_prepare_needs_a_graphquant_model(tmp_path):
    model = tiny_model("llama")
    qm = gq.quantize(model, make_config("w_int4_per_group_sym", 32), progress=False)
    hf = prepare(qm.to_hf())
    with pytest.raises(ExportError, match="save the model before preparing it"):
        hf.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(PrepareError, match="no graphquant QuantLinear"):
        prepare(tiny_model("llama"))
    assert hf.graphquant_prepared["attention"] == "sdpa"  # CPU: the decode attention backend is for CUDA
    with pytest.raises(ValueError, match="choose 'decode' or 'keep'"):
        prepare(qm.to_hf(), attention="flash")


@pytest.mark.parametrize("pre,kv", [((), None), ((C.QuaRotConfig(),), "fp8")])
def test_prepared_model_decodes_through_the_decode_attention_backend(decode_attention_on_cpu, pre, kv):
    """The attention switch of prepare (CUDA only) on CPU, with the backend taking CPU calls: the
    quantized model's greedy tokens are unchanged and its decode steps ran the op. With QuaRot and an
    fp8 KV cache the backend replaces ``graphquant_sdpa`` and runs its online R3 and K/V quantizers."""
    from graphquant import decode_attention as DA
    from graphquant import generation as G
    from graphquant.static_decode import StaticDecoder

    model = tiny_model("llama", seed=5)
    qm = gq.quantize(model, make_config("w_int8_per_channel_a_int8_per_token", None, pre=pre, kv=kv), calib(),
                     progress=False)
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = prepare(qm.to_hf())
    assert ref.config._attn_implementation == ("graphquant_sdpa" if pre else "sdpa")
    want = StaticDecoder(ref, 2, 20, compile=False).generate(ids, 8)
    hf = prepare(qm.to_hf(), check=False)
    DA.use_if_sdpa(hf)  # what prepare does on CUDA
    assert hf.config._attn_implementation == DA.NAME
    if pre:
        assert hf.model.layers[0].self_attn.graphquant_online.r3  # kept: a K quantizer follows it
    calls = decode_attention_on_cpu
    assert not calls  # the reference model (sdpa / graphquant_sdpa) never ran the op
    assert torch.equal(StaticDecoder(hf, 2, 20, compile=False).generate(ids, 8), want)
    assert len(calls) == (7 + 1) * hf.config.num_hidden_layers  # 7 decode steps + the cache-allocating forward
    assert G.PREPARED_ATTR in hf.__dict__


def test_a_wrong_fusion_is_caught_by_the_probe(monkeypatch):
    """Every projection reading the first slice (a structural mistake) changes the logits by far more than
    the tolerance: prepare refuses the model."""
    from graphquant import generation

    model = tiny_model("llama")
    qm = gq.quantize(model, make_config("w_int8_per_channel_a_int8_per_token"), calib(), progress=False)
    hf = qm.to_hf()
    monkeypatch.setattr(generation._Slice, "forward", lambda self, x: x[..., :self.stop - self.start])
    with pytest.raises(PrepareError, match="changed the model's logits"):
        prepare(hf)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_silu_mul_into_the_int4_down_projection_keeps_logits_and_tokens(monkeypatch, arch):
    """Step 4 of ``prepare``: a SiLU-gated MLP hands its fused gate|up pair to a W4A16 ``down_proj`` where the
    down projection decodes on ``w4_i8mma`` (forced here: on CPU the op computes the SiLU·mul itself and then the
    product); one-row calls reach ``graphquant::int4_linear(..., gated=True)``, logits and greedy tokens do not
    move. Gemma's MLP (a tanh GELU) keeps its own forward; the switch turns the step off."""
    from graphquant import generation
    from graphquant.kernels import int4_mm

    model = tiny_model(arch)
    qm = gq.quantize(model, make_config("w_int4_per_group_sym", 32), calib(), progress=False)
    ids = torch.randint(2, 128, (2, 9))
    monkeypatch.setattr(int4_mm, "gated_decode_fits", lambda *a: True)
    calls = []
    real = int4_mm.int4_linear
    monkeypatch.setattr(int4_mm, "int4_linear", lambda x, *a: calls.append((tuple(x.shape), a[7])) or real(x, *a))
    hf = _on_kernels(qm.to_hf())
    ref = logits(hf, ids)
    ref_tokens = hf.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    prepare(hf)
    changed = hf.graphquant_prepared["silu_into_down"]
    if arch == "gemma":
        assert changed == []
        return
    assert changed == [f"model.layers.{i}.mlp" for i in range(hf.config.num_hidden_layers)]
    mlp = hf.model.layers[0].mlp
    assert type(mlp).__name__.startswith("GraphquantGatedDown") and mlp.down_proj.gated_decode
    assert rel(logits(hf, ids), ref) < 1e-5
    calls.clear()
    assert torch.equal(hf.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0), ref_tokens)
    k = mlp.down_proj.in_features
    assert (((1, 1, 2 * k), True) in calls) and all(not gated for shape, gated in calls if shape[-1] != 2 * k)
    hf2 = _on_kernels(qm.to_hf())
    monkeypatch.setattr(generation, "SILU_INTO_DOWN", False)
    prepare(hf2)
    assert "silu_into_down" not in hf2.graphquant_prepared


def test_silu_mul_into_the_down_projection_is_undone_where_the_module_computes_something_else(monkeypatch):
    """A gated MLP whose pair-taking forward would change its output (here ``forward_gated`` made to read the gate
    half only) or fail keeps its own forward: the step's probe on random inputs catches it, module by module."""
    from graphquant.kernels import int4_mm

    qm = gq.quantize(tiny_model("llama"), make_config("w_int4_per_group_sym", 32), calib(), progress=False)
    monkeypatch.setattr(int4_mm, "gated_decode_fits", lambda *a: True)
    for wrong in (lambda self, gu: self(gu[..., :gu.shape[-1] // 2]), lambda self, gu: 1 / 0):
        monkeypatch.setattr(QuantLinear, "forward_gated", wrong)
        hf = _on_kernels(qm.to_hf())
        prepare(hf)
        assert hf.graphquant_prepared["silu_into_down"] == []
        mlp = hf.model.layers[0].mlp
        assert not type(mlp).__name__.startswith("GraphquantGatedDown") and not mlp.down_proj.gated_decode


def _glu_config(scheme, group, pre):
    if scheme != "W8A16":
        return make_config(scheme, group, pre=pre)
    return C.Config(global_quant_config=C.QuantizationConfig(weight=C.QuantizationSpec(
        dtype="int8", qscheme="per_channel", ch_axis=0)), pre_quant_opt_config=list(pre))


@pytest.mark.parametrize("scheme,group", [("w_int8_per_channel_a_int8_per_token", None), ("w_fp8_a_fp8", None),
                                          ("w_int4_per_group_sym", 32), ("W8A16", None)])
def test_silu_mul_in_the_gate_up_kernel_before_an_online_r4_keeps_logits_and_tokens(monkeypatch, scheme, group):
    """Step 5 of ``prepare``: with QuaRot's online R4 on ``down_proj``, the fused gate|up's rows are interleaved in
    ``GLU_BLOCK`` blocks and the MLP runs ``down_proj(graphquant_fused.forward_glu(x))`` where the gate|up decode
    kernel can store the SiLU·mul itself (forced here: on CPU the op computes the product, then the SiLU·mul); the
    linear op gets ``glu=True`` at every call, the gate / up halves still read the right rows, logits and greedy
    tokens do not move. Without the R4 the step leaves the MLP alone; the switch turns it off."""
    from graphquant import generation
    from graphquant.kernels import int8_mm

    monkeypatch.setattr(generation, "_glu_buckets", lambda big, device: (1, 4, 16))
    ids = torch.randint(2, 128, (2, 9))
    calls = []
    from graphquant.kernels import fp8_mm, int4_mm
    for mod, name in ((int8_mm, "int8_linear"), (int8_mm, "int8_weight_only_linear"), (fp8_mm, "fp8_linear"),
                      (int4_mm, "int4_linear")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, **k: calls.append(a[-1] is True) or _r(*a, **k))
    for pre, applies in (((C.QuaRotConfig(),), True), ((), False)):
        qm = gq.quantize(tiny_model("llama"), _glu_config(scheme, group, pre), calib(), progress=False)
        hf = _on_kernels(qm.to_hf())
        ref = logits(hf, ids)
        ref_tokens = hf.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        prepare(hf)
        changed = hf.graphquant_prepared["glu_into_gate_up"]
        mlp = hf.model.layers[0].mlp
        if not applies:
            assert changed == [] and not type(mlp).__name__.startswith("GraphquantGlu")
            continue
        assert changed == [f"model.layers.{i}.mlp" for i in range(hf.config.num_hidden_layers)]
        assert type(mlp).__name__.startswith("GraphquantGlu")
        x = torch.randn(1, 3, mlp.graphquant_fused.in_features)
        y = mlp.graphquant_fused(x)  # interleaved: the halves are the gate and up projections' outputs
        torch.testing.assert_close(torch.nn.functional.silu(mlp.gate_proj(y)) * mlp.up_proj(y),
                                   mlp.graphquant_fused.forward_glu(x), rtol=1e-2, atol=1e-3)
        assert rel(logits(hf, ids), ref) < 1e-3
        calls.clear()
        assert torch.equal(hf.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0),
                           ref_tokens)
        assert any(calls)  # the gate|up op ran with glu=True
    monkeypatch.setattr(generation, "GLU_INTO_GATE_UP", False)
    hf = gq.quantize(tiny_model("llama"), _glu_config(scheme, group, (C.QuaRotConfig(),)), calib(),
                     progress=False).to_hf()
    prepare(hf)
    assert "glu_into_gate_up" not in hf.graphquant_prepared


@pytest.mark.parametrize("arch,pre,silu_into_down", [("llama", (), True), ("qwen3", (), False),
                                                     ("mistral", (C.QuaRotConfig(),), True), ("gemma", (), True)])
def test_residual_add_and_rms_norm_into_the_int4_gate_up_keep_logits_and_tokens(monkeypatch, arch, pre,
                                                                                silu_into_down):
    """Step 6 of ``prepare``: a Llama-style decoder layer whose fused W4A16 gate|up decodes on ``w4_i8mma`` (forced
    here: on CPU the op adds, normalizes and runs the product in torch) hands the attention output, the residual
    and the post-attention RMSNorm to ``graphquant::add_rms_norm_int4_linear`` at one row, then the rest of the MLP
    (plain fused, step 4's gated down projection, or step 5's SiLU·mul before QuaRot's R4) runs from its output;
    logits and greedy tokens do not move, other row counts keep the layer's own forward. Gemma's layer (other
    norms) is left alone; a wrong rest-of-MLP is caught by the one-token probe and undone; the switch turns it off."""
    from graphquant import generation
    from graphquant.kernels import int4_mm

    monkeypatch.setattr(int4_mm, "add_norm_decode_fits", lambda *a: True)
    monkeypatch.setattr(int4_mm, "gated_decode_fits", lambda *a: True)
    monkeypatch.setattr(generation, "_glu_buckets", lambda big, device: (1, 4, 16))
    monkeypatch.setattr(generation, "SILU_INTO_DOWN", silu_into_down)
    calls = []
    real = int4_mm.add_rms_norm_int4_linear
    monkeypatch.setattr(int4_mm, "add_rms_norm_int4_linear",
                        lambda *a, **k: calls.append((tuple(a[0].shape), a[-1])) or real(*a, **k))
    qm = gq.quantize(tiny_model(arch), make_config("w_int4_per_group_sym", 32, pre=pre), calib(), progress=False)
    hf = _on_kernels(qm.to_hf())
    ids = torch.randint(2, 128, (2, 9))
    ref = logits(hf, ids)
    ref_tokens = hf.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    prepare(hf)
    changed = hf.graphquant_prepared["add_norm_into_gate_up"]
    layer = hf.model.layers[0]
    if arch == "gemma":
        assert changed == [] and not calls
        return
    assert changed == [f"model.layers.{i}" for i in range(hf.config.num_hidden_layers)]
    assert type(layer).__name__.startswith("GraphquantAddNorm")
    want_mlp = "GraphquantGlu" if pre else ("GraphquantGatedDown" if silu_into_down else "GraphquantFused")
    assert type(layer.mlp).__name__.startswith(want_mlp)
    calls.clear()
    assert rel(logits(hf, ids), ref) < 1e-3
    assert not calls  # nine rows: the layer's own forward
    assert torch.equal(hf.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0),
                       ref_tokens)
    glu = bool(pre)
    assert calls and all(c == ((1, 1, hf.config.hidden_size), glu) for c in calls), calls[:3]
    # a rest-of-MLP that computes something else: the probe undoes the step
    hf2 = _on_kernels(qm.to_hf())
    cls = type(hf.model.layers[0].mlp)
    monkeypatch.setattr(cls, "graphquant_from_fused", lambda self, y: torch.zeros(
        *y.shape[:-1], self.down_proj.out_features, dtype=y.dtype))
    prepare(hf2)
    assert hf2.graphquant_prepared["add_norm_into_gate_up"] == []
    assert not type(hf2.model.layers[0]).__name__.startswith("GraphquantAddNorm")
    monkeypatch.setattr(generation, "ADD_NORM_INTO_GATE_UP", False)
    hf3 = _on_kernels(qm.to_hf())
    prepare(hf3)
    assert "add_norm_into_gate_up" not in hf3.graphquant_prepared
