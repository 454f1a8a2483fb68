"""CLI: --output_dir safety before the work, --model_export, and eval / generate on a saved folder."""
from __future__ import annotations

import json

import pytest
import torch

from graphquant.cli import main


def test_unsafe_output_dir_is_refused_before_loading(tiny_saved_llama, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    code = main(["quantize", "--model", str(tiny_saved_llama), "--quant_scheme", "w_int8_per_tensor",
                 "--output_dir", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "not written by graphquant" in err and "--overwrite" in err and "Traceback" not in err
    assert (other / "todo.txt").read_text() == "keep me"
    code = main(["quantize", "--model", str(tiny_saved_llama), "--quant_scheme", "w_int8_per_tensor",
                 "--output_dir", str(tiny_saved_llama)])
    assert code == 2 and "is the input model folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gq_llama_20m(shared_dir):
    p = shared_dir / "data" / "models" / "gq-llama-20m"
    if not (p / "config.json").is_file():
        pytest.skip("gq-llama-20m not in the shared folder")
    return p


def test_quantize_save_then_eval_and_generate(gq_llama_20m, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(gq_llama_20m), "--quant_scheme", "w_int8_per_channel_a_int8_per_token",
                 "--pre_quantization_optimization", "quarot", "--num_calib_data", "1", "--seq_len", "32",
                 "--output_dir", str(out), "--model_export", "compressed-tensors"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "saved compressed-tensors checkpoint" in text and "transformers 5.x ignores transform_config" in text
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "graphquant_export.json"} <= names
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    ppl = {}
    for name, folder in (("fp", gq_llama_20m), ("q", out)):
        assert main(["eval", "--model", str(folder), "--eval_windows", "2", "--seq_len", "64"]) == 0
        ppl[name] = float(capsys.readouterr().out.split(": ")[1].split()[0])
    assert abs(ppl["q"] / ppl["fp"] - 1) < 0.1, ppl  # the saved model is the quantized one, not garbage
    assert main(["generate", "--model", str(out), "--prompt", "Once upon a time", "--max_new_tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Once upon a time") and "8 new tokens" in captured.err
    # --fast (prepared model, static KV cache): the same greedy text
    assert main(["generate", "--model", str(out), "--prompt", "Once upon a time", "--max_new_tokens", "8",
                 "--fast"]) == 0
    fast = capsys.readouterr()
    assert fast.out == captured.out and "8 new tokens; first call" in fast.err
    # a second run replaces the graphquant output without --overwrite
    code = main(["quantize", "--model", str(gq_llama_20m), "--quant_scheme", "w_fp8_a_fp8", "--num_calib_data", "1",
                 "--seq_len", "16", "--output_dir", str(out), "--model_export", "hf_format"])
    assert code == 0 and json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "quark"


def test_stories260k_tied_embeddings_save_and_load(shared_dir, tmp_path):
    """llama2.c stories260K ties its embeddings: saving used to crash ('tensors share memory')."""
    import graphquant as gq
    from graphquant.models.hf import load_model

    src = shared_dir / "data" / "models" / "stories260K"
    if not src.is_dir():
        pytest.skip("stories260K not in the shared folder")
    model, _ = load_model(str(src))
    assert model.config.tie_word_embeddings
    from test_export_hf import make_config

    import dataclasses

    for cfg in (dataclasses.replace(make_config("w_int8_per_tensor"), exclude=[]),  # lm_head quantized: untied
                dataclasses.replace(make_config("w_int8_per_tensor"), exclude=["*lm_head"])):
        qm = gq.quantize(model, cfg, progress=False)
        out = tmp_path / "q"
        qm.save_pretrained(out)
        loaded = gq.load(out)
        ids = torch.randint(0, model.config.vocab_size, (2, 10))
        assert torch.equal(loaded(input_ids=ids).logits, qm(input_ids=ids).logits)
        excluded = bool(cfg.exclude)
        assert loaded.config.tie_word_embeddings == bool(excluded)


def test_generate_fast_refuses_sampling_in_one_line(capsys):
    assert main(["generate", "--model", "nowhere", "--prompt", "x", "--fast", "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fast generates greedily" in err[0]
