"""The generation fast path on CUDA: ``prepare`` (kernels, fused projections, tinygemm int4 decode,
fused R4 + quantize) under ``StaticDecoder`` (static KV cache, torch.compile, CUDA graph) against the
fake-quant write-back. Skipped without CUDA (CI has none); gq-llama-20m when its folder is present."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import graphquant as gq
from graphquant import config as C
from graphquant.export.qlinear import QuantLinear
from graphquant.generation import prepare
from graphquant.models.tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles a new StaticDecoder step; without a reset, dynamo's per-function recompile limit (8)
    stops the ninth one in the same process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

REPO = Path(__file__).resolve().parents[1]
GQ20M = next((p for p in (REPO / ".devdata" / "gq-llama-20m",
                          Path(os.environ.get("GRAPHQUANT_SHARED", REPO.parent / "shared")) / "data" / "models"
                          / "gq-llama-20m") if (p / "config.json").is_file()), None)


def _w8a16():
    return C.Config(global_quant_config=C.QuantizationConfig(
        weight=C.QuantizationSpec(dtype="int8", qscheme="per_channel", ch_axis=0)))


SCHEMES = {
    "fp8 dynamic": lambda: C.preset("w_fp8_a_fp8_per_token"),
    "fp8 static": lambda: C.preset("w_fp8_a_fp8"),
    "int8 W8A8": lambda: C.preset("w_int8_per_channel_a_int8_per_token"),
    "W8A16": _w8a16,
    "W4A16 g128": lambda: C.preset("w_int4_per_group_sym"),
}


def _config(name, quarot, group=None):
    cfg = dataclasses.replace(SCHEMES[name](), exclude=["*lm_head"])
    if group and "W4" in name:  # the tiny model's in_features (64) hold no group of 128
        g = cfg.global_quant_config
        cfg = dataclasses.replace(cfg, global_quant_config=dataclasses.replace(g, weight=g.weight.evolve(group_size=group)))
    return dataclasses.replace(cfg, pre_quant_opt_config=[C.QuaRotConfig()]) if quarot else cfg


def _calib(vocab, n=4, length=64):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, length), generator=g).cuda() for _ in range(n)]


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("quarot", [False, True])
def test_fast_path_logits_match_fake_quant_on_a_tiny_model(name, quarot):
    from graphquant.static_decode import StaticDecoder

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    qm = gq.quantize(model, _config(name, quarot, group=32), _calib(model.config.vocab_size), progress=False,
                     check=False)
    ref_model = qm.to_hf(device="cuda")
    fast = prepare(qm.to_hf(kernels="always", device="cuda"))
    assert fast.graphquant_prepared["fused"], fast.graphquant_prepared
    assert all(m.backend == "kernel" for m in fast.modules() if isinstance(m, QuantLinear))
    ids = torch.randint(2, model.config.vocab_size, (1, 12), device="cuda")
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits.float()
        out = fast(input_ids=ids).logits.float()
    assert float((out - ref).norm() / ref.norm()) < (5e-2 if "W8A8" in name or "fp8" in name else 1e-2)
    dec = StaticDecoder(fast, batch_size=1, max_length=40)
    toks = dec.generate(ids, max_new_tokens=16)
    assert toks.shape == (1, 28) and torch.equal(toks[:, :12], ids)
    from graphquant.kernels import int8_mm

    assert not int8_mm._FAILED, int8_mm._FAILED


#: H200, 2026-11-29: fp8 static (per-tensor static activation scales) parts from fake-quant at the second new
#: token, where the fake-quant model's top-2 logit margin is 0.0625 (one bf16 step at that logit size): a near-tie
#: that the kernels' different rounding flips. int8 W8A8 and W4A16 g128 gave 32/32 in the same run.
NEAR_TIE = pytest.mark.xfail(reason="near-tie at the second new token (top-2 margin 0.0625, H200)", strict=False)


@pytest.mark.skipif(GQ20M is None, reason="gq-llama-20m not available")
@pytest.mark.parametrize("name", [pytest.param(n, marks=NEAR_TIE) if n == "fp8 static" else n for n in SCHEMES])
def test_gq_llama_20m_fast_path_greedy_tokens_equal_fake_quant(name):
    """The issue's check: 32 greedy tokens of the fast path (kernels, fusion, compile, CUDA graph) equal
    those of the fake-quant model (HF generate, no kernels) on a trained model."""
    _greedy_tokens_equal_fake_quant(name)


#: H200, 2026-11-30: with every fp8 decode product on the SWAP tiles (fp8 sums in the tensor core's own precision
#: per K step), fp8 dynamic parts from fake-quant at new token 8, where the fake-quant model's top-2 margin is 0.0625
#: (one bf16 step); the unswapped kernels give 32/32 in the same run, and int8 (exact sums either way) is not affected.
SWAP_FP8_NEAR_TIE = pytest.mark.xfail(reason="near-tie at new token 8 (top-2 margin 0.0625, H200)", strict=False)


@pytest.mark.skipif(GQ20M is None, reason="gq-llama-20m not available")
@pytest.mark.parametrize("name", [pytest.param("fp8 dynamic", marks=SWAP_FP8_NEAR_TIE), "int8 W8A8"])
def test_gq_llama_20m_greedy_tokens_with_every_w8a8_product_swapped(name, monkeypatch):
    """As above with every W8A8 decode product on ``wq_mm``'s ``SWAP`` tiles (the weight as the left operand; fp8
    summed in the tensor core's own precision per K step), which the H200 table picks for the Llama-3-8B shapes
    but the heuristics do not for gq-llama-20m's small ones."""
    from graphquant.kernels import quant_triton as QT

    real = QT.decode_choice

    def swapped(M, N, K, a_kind, w_kind, group, device):
        if a_kind != QT.A_FLOAT and M <= 16:
            return "wq_mm", dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3, SWAP=True)
        return real(M, N, K, a_kind, w_kind, group, device)

    calls = []
    monkeypatch.setattr(QT, "decode_choice", lambda *a: calls.append(a) or swapped(*a))
    _greedy_tokens_equal_fake_quant(name)
    assert any(c[3] != QT.A_FLOAT for c in calls)


#: H200, 2026-11-30, QuaRot (gq-llama-20m's 1152 = 36 x 32: the Triton R4 kernels): W4A16 g128 parts from fake-quant
#: at new token 19 where the fake-quant model's top-2 margin is 0 (an exact tie), fp8 dynamic at new token 8 (0.0625,
#: one bf16 step, as its SWAP near-tie above); int8 W8A8, W8A16 and fp8 static gave 32/32 in the same run.
QUAROT_TIE = pytest.mark.xfail(reason="near-tie (W4A16: top-2 margin 0 at new token 19; fp8 dynamic: 0.0625 at 8)",
                               strict=False)


@pytest.mark.skipif(GQ20M is None, reason="gq-llama-20m not available")
@pytest.mark.parametrize("name", [pytest.param(n, marks=QUAROT_TIE) if n in ("W4A16 g128", "fp8 dynamic") else n
                                  for n in SCHEMES])
def test_gq_llama_20m_quarot_greedy_tokens_equal_fake_quant(name):
    """As above with QuaRot: the online R4 (and its fused activation quantizer) on the Triton kernels under
    ``torch.compile`` for an order outside the measured plans (1152)."""
    _greedy_tokens_equal_fake_quant(name, quarot=True)


@pytest.mark.skipif(GQ20M is None, reason="gq-llama-20m not available")
@pytest.mark.parametrize("quarot", [False, pytest.param(True, marks=QUAROT_TIE)])
def test_gq_llama_20m_greedy_tokens_with_every_w4a16_product_on_int8_mma(quarot, monkeypatch):
    """The issue's check with every W4A16 decode product on ``w4_i8mma`` (the activation's exact int8 pieces times
    the nibbles on the int8 tensor cores), which the H200 table picks for the Llama-3-8B gate|up and down shapes
    but not for gq-llama-20m's. H200, 2026-11-30: 32/32 without QuaRot; with it the same exact tie as the other
    W4A16 kernels (new token 19, top-2 margin 0)."""
    from graphquant.kernels import quant_triton as QT

    calls = _w4a16_decode_on_int8_mma(monkeypatch)
    _greedy_tokens_equal_fake_quant("W4A16 g128", quarot=quarot)
    assert any(c[4] == QT.W_INT4 and c[0] <= 4 for c in calls)


def _w4a16_decode_on_int8_mma(monkeypatch) -> list:
    """Every W4A16 decode product (1-4 rows) on ``w4_i8mma`` (fixed tiles, four groups per step), the other products
    on the table's choice; returns the list the decode choices are recorded in."""
    from graphquant.kernels import quant_triton as QT

    real = QT.decode_choice
    calls = []

    def on_int8_mma(M, N, K, a_kind, w_kind, group, device):
        calls.append((M, N, K, a_kind, w_kind, group, device))
        if a_kind == QT.A_FLOAT and w_kind == QT.W_INT4 and M <= 4:
            return "w4_i8mma", dict(BLOCK_N=64, SPLIT_K=2, GPS=4, num_warps=4, num_stages=3)
        return real(M, N, K, a_kind, w_kind, group, device)

    monkeypatch.setattr(QT, "decode_choice", on_int8_mma)
    return calls


#: H200, 2026-11-30: gq-llama-20m W4A16 with groups of 32 and every decode product on ``w4_i8mma`` parts from
#: fake-quant also without step 6 (31/32: an exact tie, top-2 margin 0, at new token 31); with step 6 (its RMSNorm's
#: sum of squares and rsqrt rounded in another order than Inductor's) at new token 1, top-2 margin 0.0625 (one bf16
#: step); with QuaRot and step 6 at new token 16, margin 0 (an exact tie). In both the prepare report and the step's
#: calls, checked before the tokens, passed (``--runxfail``).
G32_TIE = pytest.mark.xfail(reason="near-ties of this config (new token 1: margin 0.0625; 31: margin 0)",
                            strict=False)
G32_QUAROT_TIE = pytest.mark.xfail(reason="exact tie of this config with QuaRot (new token 16: margin 0)",
                                   strict=False)


@pytest.mark.skipif(GQ20M is None, reason="gq-llama-20m not available")
@pytest.mark.parametrize("quarot", [pytest.param(False, marks=G32_TIE), pytest.param(True, marks=G32_QUAROT_TIE)])
def test_gq_llama_20m_greedy_tokens_with_the_residual_add_and_norm_in_the_pieces_launch(quarot, monkeypatch):
    """The issue's check through ``prepare``'s step 6 (the decoder layer's residual add + RMSNorm make the W4A16
    gate|up's ``w4_i8mma`` pieces in one launch): every W4A16 decode product on ``w4_i8mma`` and groups of 32, so
    that gq-llama-20m's 384-wide rows are whole steps of four groups. The step must apply to all 8 layers and
    run (checked before the tokens, so an expected near-tie failure still checks them)."""
    from graphquant.kernels import quant_triton as QT

    _w4a16_decode_on_int8_mma(monkeypatch)
    calls = []
    real_pieces = QT.add_rms_norm_pieces
    monkeypatch.setattr(QT, "add_rms_norm_pieces", lambda *a: calls.append(a[0].shape) or real_pieces(*a))

    def applied(report):
        assert len(report["add_norm_into_gate_up"]) == 8, report
        assert calls  # the step's one-token probe ran the fused launch

    _greedy_tokens_equal_fake_quant("W4A16 g128", quarot=quarot, group=32, on_prepared=applied)


def _greedy_tokens_equal_fake_quant(name, quarot=False, group=None, on_prepared=None):
    from transformers import AutoModelForCausalLM

    from graphquant.static_decode import StaticDecoder

    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(GQ20M, dtype=torch.bfloat16).cuda().eval()
    qm = gq.quantize(model, _config(name, quarot, group), _calib(model.config.vocab_size), progress=False,
                     check=False)
    ref_model = qm.to_hf(device="cuda")
    # a story opening (gq-llama-20m is a TinyStories-style model): random token ids give flat next-token
    # distributions whose near-ties flip under any rounding change
    ids = AutoTokenizer.from_pretrained(GQ20M)("Once upon a time, there was a little girl named Lily. She loved",
                                              return_tensors="pt").input_ids.cuda()
    n = ids.shape[1]
    # the prompt starts with BOS (id 0 here): an explicit all-ones mask, or generate() would take id 0 for padding
    want = ref_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False, pad_token_id=model.config.pad_token_id)
    fast = prepare(qm.to_hf(kernels="always", device="cuda"))
    if on_prepared is not None:
        on_prepared(fast.graphquant_prepared)
    got = StaticDecoder(fast, batch_size=1, max_length=n + 40).generate(ids, max_new_tokens=32)
    if not torch.equal(got, want):
        first = int((got != want).nonzero()[0, 1])
        with torch.no_grad():  # the fake-quant model's top-2 margin where the two first part
            top = ref_model(input_ids=want[:, :first]).logits[0, -1].float().topk(2).values
        same = int((got == want).all(0).sum()) - n
        raise AssertionError(f"{name}: {same}/32 tokens equal, first difference at new token {first - n}, where "
                             f"the fake-quant model's top-2 logit margin is {float(top[0] - top[1]):.4f}\n"
                             f"{got.tolist()}\n{want.tolist()}")
    return fast.graphquant_prepared
