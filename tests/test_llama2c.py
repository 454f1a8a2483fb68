"""llama2.c loader: exact equivalence with an independent numpy forward pass, greedy text, perplexity, bad files."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from graphquant.errors import CheckpointError
from graphquant.eval import perplexity
from graphquant.models.llama2c import Llama2cTokenizer, load_llama2c, rope_permutation

SHARED = Path(os.environ.get("GRAPHQUANT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
MODEL_DIR = SHARED / "data" / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "text" / "tinystories-valid-sample" / "tinystories_val.txt"

needs_model = pytest.mark.skipif(not (MODEL_DIR / "stories260K.bin").is_file(),
                                 reason=f"stories260K not found under {MODEL_DIR}")


@pytest.fixture(scope="module")
def model():
    return load_llama2c(MODEL_DIR)


@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer(MODEL_DIR / "tok512.bin")


# ---------------------------------------------------------------- independent reference (llama2.c semantics)

def _read_raw(path: Path):
    """Parse the checkpoint with numpy only (no graphquant code), as run.c's memory_map_weights does."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    f = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    hd = dim // n_heads
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = f[pos:pos + n].reshape(shape)
        pos += n
        return out

    w = dict(emb=take(abs(vocab), dim), rms_att=take(n_layers, dim), wq=take(n_layers, n_heads * hd, dim),
             wk=take(n_layers, n_kv * hd, dim), wv=take(n_layers, n_kv * hd, dim), wo=take(n_layers, dim, n_heads * hd),
             rms_ffn=take(n_layers, dim), w1=take(n_layers, hidden, dim), w2=take(n_layers, dim, hidden),
             w3=take(n_layers, hidden, dim), rms_final=take(dim))
    take(seq_len, hd)  # legacy freq_cis_real / freq_cis_imag tables, unused
    w["cls"] = take(abs(vocab), dim) if vocab < 0 else w["emb"]
    return w, dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, hd=hd)


def _reference_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama2.c's forward in float64: interleaved-pair RoPE, GQA, SwiGLU, RMSNorm eps 1e-5."""
    w, c = _read_raw(path)
    T, hd, nh, nkv = len(tokens), c["hd"], c["n_heads"], c["n_kv"]

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x):  # x: (T, heads, hd); rotate pairs (2i, 2i+1) by pos * 10000^(-2i/hd)
        i = np.arange(hd // 2)
        ang = np.arange(T)[:, None] * (10000.0 ** (-2.0 * i / hd))[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = w["emb"][tokens]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(c["n_layers"]):
        h = rmsnorm(x, w["rms_att"][l])
        q = rope((h @ w["wq"][l].T).reshape(T, nh, hd))
        k = rope((h @ w["wk"][l].T).reshape(T, nkv, hd))
        v = (h @ w["wv"][l].T).reshape(T, nkv, hd)
        att_out = np.empty((T, nh, hd))
        for head in range(nh):
            kvh = head // (nh // nkv)
            s = q[:, head] @ k[:, kvh].T / np.sqrt(hd) + causal
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            att_out[:, head] = p @ v[:, kvh]
        x = x + att_out.reshape(T, nh * hd) @ w["wo"][l].T
        h = rmsnorm(x, w["rms_ffn"][l])
        a = h @ w["w1"][l].T
        x = x + ((a / (1 + np.exp(-a))) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return rmsnorm(x, w["rms_final"]) @ w["cls"].T


# ---------------------------------------------------------------------------------------------------- tests

def test_rope_permutation():
    assert rope_permutation(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@needs_model
def test_config_and_tied_weights(model):
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.rms_norm_eps == 1e-5
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 260_032
    assert not model.training


@needs_model
def test_logits_match_independent_reference(model):
    rng = np.random.default_rng(0)
    tokens = [1] + rng.integers(3, 512, size=47).tolist()
    ref = _reference_logits(MODEL_DIR / "stories260K.bin", tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"\nstories260K HF vs numpy llama2.c reference: max rel err {rel:.2e}")
    assert rel < 1e-5, rel


@needs_model
def test_without_rope_permutation_differs(model):
    """Guards the test above: without the wq/wk row permutation the logits really are different."""
    import copy

    broken = copy.deepcopy(model)
    perm = rope_permutation(8)
    inv = torch.argsort(perm)
    with torch.no_grad():
        for layer in broken.model.layers:
            for lin, heads in ((layer.self_attn.q_proj, 8), (layer.self_attn.k_proj, 4)):
                lin.weight.copy_(lin.weight.reshape(heads, 8, -1)[:, inv].reshape(heads * 8, -1))
        x = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376]])
        assert (broken(x).logits - model(x).logits).abs().max() > 1e-3


@needs_model
def test_tokenizer_roundtrip(tok):
    ids = tok.encode("Once upon a time, there was a little girl named Lily.")
    assert ids[0] == 1 and len(ids) < 20  # merges happened
    assert tok.decode(ids) == "Once upon a time, there was a little girl named Lily."
    text = "Zoë said: naïve ✓ 日本\n"  # byte fallback for characters without a piece
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("", bos=True) == [1]
    assert tok.encode("hi", bos=False, eos=True)[-1] == 2


@needs_model
def test_greedy_decoding_is_the_known_story(model, tok):
    with torch.no_grad():
        out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0])
    print(f"\nstories260K greedy: {text!r}")
    expected = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                "One day, she saw a big, red ball.")
    n = min(len(text), len(expected))
    assert text.startswith("Once upon a time")
    assert text[:n] == expected[:n] and n >= 60, text


@needs_model
@pytest.mark.skipif(not TINYSTORIES.is_file(), reason="TinyStories sample not found")
def test_tinystories_perplexity(model, tok):
    """The README protocol: first 400 paragraphs (split on blank lines), each encoded with BOS, scored in
    non-overlapping 256-token windows. README: 39,074 tokens, 1.437 nats/token, ppl 4.21."""
    paragraphs = [p.strip() for p in TINYSTORIES.read_text().split("\n\n") if p.strip()][:400]
    ids = torch.tensor([i for p in paragraphs for i in tok.encode(p, bos=True)])
    res = perplexity(model, ids, seqlen=256, batch_size=16)
    print(f"\nstories260K TinyStories ({ids.numel()} tokens): {res}")
    assert abs(ids.numel() - 39_074) <= 10
    assert res.num_windows == ids.numel() // 256 == 152
    assert res.mean_loss == pytest.approx(1.437, abs=0.01) and 4.15 < res.ppl < 4.26, res


def _naive_merge(tok: Llama2cTokenizer, tokens: list[int]) -> list[int]:
    """run.c's merge loop verbatim: rescan all pairs, merge the best-scoring one (leftmost on ties)."""
    tokens = list(tokens)
    while True:
        best_score, best_i, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            tid = tok._ids.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]])
            if tid is not None and tok.scores[tid] > best_score:
                best_score, best_i, best_id = tok.scores[tid], i, tid
        if best_i < 0:
            return tokens
        tokens[best_i:best_i + 2] = [best_id]


@needs_model
def test_fast_merge_equals_run_c_loop(tok, monkeypatch):
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz   ,.!?'\"\nTOLé✓")
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 120)))) for _ in range(300)]
    if TINYSTORIES.is_file():
        texts += TINYSTORIES.read_text().split("\n\n")[:30]
    fast = [tok.encode(t) for t in texts]
    monkeypatch.setattr(tok, "_merge", lambda ts: _naive_merge(tok, ts))
    assert fast == [tok.encode(t) for t in texts]


@needs_model
def test_truncated_checkpoint_raises(tmp_path):
    data = (MODEL_DIR / "stories260K.bin").read_bytes()
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated: expected 1,056,540 bytes .*actual size 1,055,540 bytes"):
        load_llama2c(bad)
    bad.write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="trailing data"):
        load_llama2c(bad)


def test_not_a_checkpoint_raises(tmp_path):
    f = tmp_path / "garbage.bin"
    f.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="valid llama2.c header"):
        load_llama2c(f)
    f.write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="28-byte header"):
        load_llama2c(f)
    with pytest.raises(CheckpointError, match="no such llama2.c checkpoint"):
        load_llama2c(tmp_path / "does_not_exist.bin")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="no llama2.c checkpoint"):
        load_llama2c(tmp_path / "d")


def test_small_synthetic_untied_checkpoint(tmp_path):
    """A random llama2.c file with an untied classifier (negative vocab_size) loads and matches the reference."""
    dim, hidden, L, nh, nkv, vocab, seq = 16, 24, 2, 4, 2, 32, 16
    hd = dim // nh
    rng = np.random.default_rng(1)
    sizes = [vocab * dim, L * dim, L * dim * dim, L * nkv * hd * dim, L * nkv * hd * dim, L * dim * dim, L * dim,
             L * hidden * dim, L * dim * hidden, L * hidden * dim, dim, seq * hd // 2, seq * hd // 2, vocab * dim]
    arrays = [rng.standard_normal(n).astype("<f4") * 0.3 for n in sizes]
    arrays[1][:] = 1.0 + 0.1 * arrays[1]
    arrays[6][:] = 1.0 + 0.1 * arrays[6]
    f = tmp_path / "m.bin"
    f.write_bytes(struct.pack("<7i", dim, hidden, L, nh, nkv, -vocab, seq) + b"".join(a.tobytes() for a in arrays))
    m = load_llama2c(f)
    assert not m.config.tie_word_embeddings
    assert torch.equal(m.lm_head.weight, torch.from_numpy(arrays[-1].reshape(vocab, dim)))
    tokens = [1, 5, 7, 9, 30, 2]
    ref = _reference_logits(f, tokens)
    with torch.no_grad():
        got = m(torch.tensor([tokens])).logits[0].double().numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
