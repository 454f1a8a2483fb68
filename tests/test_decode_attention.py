"""graphquant::decode_attention: the reference equals SDPA, the Triton kernel equals the reference (in
Triton's interpreter, a subprocess), and the transformers backend decodes the tokens of sdpa (CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphquant import decode_attention as DA
from graphquant.models.tiny import tiny_model
from graphquant.static_decode import StaticDecoder

ROOT = Path(__file__).resolve().parents[1]


def _sdpa(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_sdpa_with_grouped_heads(mask_kind, dtype):
    g = torch.Generator().manual_seed(0)
    B, HQ, HKV, S, D = 3, 8, 2, 37, 16
    q = torch.randn(B, HQ, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, HKV, S, D, generator=g).to(dtype) for _ in range(2))
    keep = torch.rand(B, S, generator=g) > 0.4
    mask = {"none": None, "bool": keep,
            "additive": torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)}[mask_kind]
    got = DA.decode_attention_reference(q, k, v, mask, 0.3)
    want = _sdpa(q.float(), k.float(), v.float(), None if mask is None else mask.float() if mask_kind == "additive"
                 else mask, 0.3)
    assert got.shape == (B, 1, HQ, D) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)
    # the op (CPU kernel = the reference) gives the same
    assert torch.equal(torch.ops.graphquant.decode_attention(q, k, v, mask, 0.3), got)


def test_fully_masked_sequence_gives_zeros_not_nan():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.tensor([[True] * 5, [False] * 5])
    out = DA.decode_attention_reference(q, k, v, mask, 0.25)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0


_KERNEL_CHECK = r"""
import itertools, torch
from graphquant.decode_attention import decode_attention_reference as ref
from graphquant.kernels import decode_attention_triton as K
torch.manual_seed(0)
worst = 0.0
for (B, HQ, HKV, S, D), kind, splits in itertools.product(
        [(1, 8, 2, 100, 64), (2, 4, 4, 70, 32), (3, 6, 2, 33, 16)], ["none", "bool", "additive", "tail"], [None, 1, 3]):
    q = torch.randn(B, 1, HQ, D, dtype=torch.bfloat16).transpose(1, 2)  # HF's strided layout
    k, v = (torch.randn(B, HKV, S, D, dtype=torch.bfloat16) for _ in range(2))
    m = {"none": None, "bool": torch.rand(B, S) > 0.3,
         "additive": torch.where(torch.rand(B, S) > 0.3, 0.0, float("-inf")).to(torch.bfloat16)}.get(kind)
    if kind == "tail":  # a static cache's empty tail, one sequence fully masked, a broadcast (stride-0) view
        m = torch.zeros(1, S, dtype=torch.bool)
        m[:, : S // 2] = True
        m = m.expand(B, S).clone()
        m[-1] = False
    a = K.decode_attention_triton(q, k, v, m, D ** -0.5, splits=splits)
    r = ref(q, k, v, m, D ** -0.5)
    assert a.shape == r.shape and a.dtype == r.dtype
    err = ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
    worst = max(worst, err)
    assert err < 2e-2, (B, HQ, HKV, S, D, kind, splits, err)
print("worst relative error", worst)
"""


def test_triton_kernel_equals_reference_in_the_interpreter():
    """Every mask kind, split count (1: no merge kernel) and query-group size; bf16 inputs."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "interpreter" in run.stderr.lower() and "assert" not in run.stderr.lower():
        pytest.skip(f"this Triton's interpreter cannot run the kernel: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "worst relative error" in run.stdout


def test_split_plan_covers_the_cache_with_enough_programs():
    pytest.importorskip("triton")
    from graphquant.kernels import decode_attention_triton as K

    for b, h, s in [(1, 8, 384), (16, 8, 384), (1, 8, 8192), (4, 1, 17), (64, 8, 4096)]:
        chunk, splits = K.split_plan(b, h, s, sms=132)
        assert chunk % K.BLOCK_S == 0 and (splits - 1) * chunk < s <= splits * chunk
        assert splits <= K.MAX_SPLITS
        assert b * h * splits >= min(K.TARGET_PROGRAMS * 132, b * h * min(K.MAX_SPLITS, -(-s // K.BLOCK_S))) * 0.5
    # the measured cases (benchmarks/decode_attention_gpu.py --splits): Llama-3-8B's 8 KV heads on 132 SMs
    assert [K.split_plan(b, 8, s)[1] for b, s in ((1, 384), (16, 384), (1, 4096), (16, 4096))] == [12, 6, 32, 7]


def _greedy(model, ids, n):
    return StaticDecoder(model, ids.shape[0], ids.shape[1] + n + 3, compile=False).generate(ids, n)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mistral", "gemma", "phi3"])
def test_backend_decodes_the_tokens_of_sdpa(decode_attention_on_cpu, arch):
    """Grouped-query tiny models: the decode steps go through the op (counted), prefill through sdpa,
    and the greedy tokens equal those of the stock sdpa model."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    ref_model = tiny_model(arch, seed=2)
    want = _greedy(ref_model, ids, 10)
    model = DA.use(tiny_model(arch, seed=2))
    assert model.config._attn_implementation == DA.NAME
    got = _greedy(model, ids, 10)
    assert torch.equal(got, want)
    calls = decode_attention_on_cpu
    assert calls and all(s[2] == 1 for s in calls)  # one query position per call
    # logits of one decode step agree to rounding (not only the argmax)
    dec_a, dec_b = StaticDecoder(ref_model, 2, 20, compile=False), StaticDecoder(model, 2, 20, compile=False)
    for d in (dec_a, dec_b):
        d.prefill(ids)
    pos = torch.tensor([6])
    la = ref_model(input_ids=want[:, 6:7], position_ids=pos.view(1, 1), past_key_values=dec_a.cache).logits
    lb = model(input_ids=want[:, 6:7], position_ids=pos.view(1, 1), past_key_values=dec_b.cache).logits
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-4)


def test_backend_compiles_into_the_decode_step(decode_attention_on_cpu):
    """fullgraph torch.compile of the decode step keeps the op as one node (as on the GPU, before the CUDA graph)."""
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    want = _greedy(tiny_model("llama", seed=4), ids, 6)
    model = DA.use(tiny_model("llama", seed=4))
    dec = StaticDecoder(model, 1, 16, compile=True, compile_prefill=False)
    assert torch.equal(dec.generate(ids, 6), want)
    assert len(decode_attention_on_cpu) >= 5 * 2  # 5 compiled decode steps x 2 layers ran the op


def test_other_calls_go_to_sdpa_unchanged(monkeypatch):
    """Prefill (several query positions), CPU tensors, dropout and softcap are sdpa's."""
    seen = []
    import transformers.integrations.sdpa_attention as S

    monkeypatch.setattr(S, "sdpa_attention_forward", lambda *a, **k: seen.append(a[1].shape) or ("sdpa", None))
    q1, q5 = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 8, 16)
    assert DA.attention_forward(None, q5, k, v, None)[0] == "sdpa"
    assert DA.attention_forward(None, q1, k, v, None)[0] == "sdpa"  # CPU: not in DEVICES
    monkeypatch.setattr(DA, "DEVICES", ("cpu",))
    assert DA.attention_forward(None, q1, k, v, None, dropout=0.1)[0] == "sdpa"
    assert DA.attention_forward(None, q1, k, v, None, softcap=30.0)[0] == "sdpa"
    per_head_mask = torch.ones(1, 4, 1, 8, dtype=torch.bool)
    assert DA.attention_forward(None, q1, k, v, per_head_mask)[0] == "sdpa"
    out, weights = DA.attention_forward(None, q1, k, v, None)
    assert weights is None and out.shape == (1, 1, 4, 16)
    assert len(seen) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 16])
def test_kernel_on_the_gpu_at_llama3_8b_shapes(batch):
    """32 query / 8 KV heads of 128, a 384-slot static cache filled to 257, bool and additive masks, and the
    HF layout of the query; against the fp32 reference and torch's SDPA."""
    from graphquant.kernels import decode_attention_triton as K

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, 1, 32, 128, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(batch, 8, 384, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    keep = torch.zeros(batch, 384, dtype=torch.bool, device="cuda")
    keep[:, :257] = True
    for mask in (keep, torch.where(keep, 0.0, float("-inf")).to(torch.bfloat16), None):
        for splits in (None, 1):
            got = K.decode_attention_triton(q, k, v, mask, 128 ** -0.5, splits=splits)
            ref = DA.decode_attention_reference(q, k, v, mask, 128 ** -0.5)
            assert (got.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    sdpa = _sdpa(q, k, v, keep, 128 ** -0.5)
    assert (DA.decode_attention(q, k, v, keep, 128 ** -0.5).float() - sdpa.float()).abs().max() < 2e-2


def test_backend_with_a_sliding_window_cache(decode_attention_on_cpu):
    """Mistral with a 5-token window: the static cache keeps a 5-slot ring (StaticSlidingWindowLayer) and the mask
    says which slots are live; 14 new tokens go past the window and equal sdpa's."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    want = _greedy(tiny_model("mistral", seed=2, sliding_window=5), ids, 14)
    model = DA.use(tiny_model("mistral", seed=2, sliding_window=5))
    assert torch.equal(_greedy(model, ids, 14), want)
    calls = decode_attention_on_cpu
    assert calls and all(shape[2] == 1 for shape in calls)


def test_use_if_sdpa_switches_sdpa_and_graphquant_sdpa_only():
    from graphquant.export import attention as A

    assert DA.use_if_sdpa(tiny_model("llama")).config._attn_implementation == DA.NAME
    wrapped = tiny_model("llama")
    wrapped.set_attn_implementation(A.register("sdpa"))  # graphquant_sdpa: online R3 / KV quantizers
    assert DA.use_if_sdpa(wrapped).config._attn_implementation == DA.NAME
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert DA.use_if_sdpa(eager).config._attn_implementation == "eager"


@pytest.mark.parametrize("arch,window,causal_cut", [("llama", None, True), ("qwen3", None, True),
                                                     ("mistral", 5, False)])
def test_empty_cache_prefill_attends_to_the_prompt_keys_only(monkeypatch, arch, window, causal_cut):
    """Inside ``empty_cache_prefill`` a prompt of L tokens gets the first L keys of the static cache and
    ``is_causal`` (same logits as the cache-long mask); a sliding window keeps the mask. transformers' own cut
    (mask skipped where it sees an empty cache) is switched off, as it is under ``torch.compile``."""
    import contextlib

    import transformers.integrations.sdpa_attention as S
    import transformers.masking_utils as MU
    from transformers import StaticCache

    monkeypatch.setattr(MU, "_ignore_causal_mask_sdpa", lambda *a, **k: False)

    seen = []
    real = S.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append((k.shape[2], mask is None))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(S, "sdpa_attention_forward", spy)
    extra = {"sliding_window": window} if window else {}
    model = DA.use(tiny_model(arch, seed=5, **extra))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(6))

    def logits(empty):
        cache = StaticCache(config=model.config, max_cache_len=24)
        with DA.empty_cache_prefill() if empty else contextlib.nullcontext(), torch.no_grad():
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    masked = logits(False)
    assert seen and all(no_mask is False for _, no_mask in seen)  # a mask over the cache's keys
    assert not causal_cut or seen[0][0] == 24
    seen.clear()
    cut = logits(True)
    assert seen and all(s == (8, True) if causal_cut else s[1] is False for s in seen), seen
    assert torch.allclose(cut, masked, atol=1e-5, rtol=1e-4)
    assert not DA._EMPTY_CACHE_PREFILL[0]  # the context restores the flag


def test_compiled_static_decoder_prefill_takes_the_causal_cut(monkeypatch):
    """Under torch.compile (where transformers keeps the cache-long mask) StaticDecoder's prefill runs the
    prompt on its own keys with is_causal, and the greedy tokens equal the stock sdpa model's."""
    import transformers.integrations.sdpa_attention as S

    seen = []
    real = S.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append((q.shape[2], k.shape[2], mask is None))
        return real(module, q, k, v, mask, **kw)

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(6))
    want = _greedy(tiny_model("llama", seed=5), ids, 4)
    monkeypatch.setattr(S, "sdpa_attention_forward", spy)
    dec = StaticDecoder(DA.use(tiny_model("llama", seed=5)), 2, 30, compile=True)
    assert torch.equal(dec.generate(ids, 4), want)
    assert [s for s in seen if s[0] == 8] == [(8, 8, True)] * 2  # two layers, traced once
