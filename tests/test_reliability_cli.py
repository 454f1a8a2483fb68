"""Issue 12 through the command line: flags are checked before the model loads, Quark's flags are
accepted, every failure is one line on stderr (never a traceback)."""
from __future__ import annotations

import string

import pytest
import torch

from graphquant.cli import build_config, build_parser, main


def _char_tokenizer():
    """A character-level tokenizer built offline (no hub access), 101 ids < the tiny vocab of 128."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable:
        if c not in "\x0b\x0c":
            vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _save(folder, nan: bool = False):
    from graphquant.models.tiny import tiny_model

    model = tiny_model("llama", num_layers=1)
    if nan:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    model.save_pretrained(folder)
    _char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny_tok"))


def _run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


FAST = ["--num_calib_data", "2", "--seq_len", "32", "--calib_batch_size", "2"]


# --- item 6: out-of-range values are refused up front, before the model is loaded ----------------------
@pytest.mark.parametrize("flags,expected", [
    (["--num_calib_data", "0"], "--num_calib_data: must be a positive integer"),
    (["--seq_len", "0"], "--seq_len: must be a positive integer"),
    (["--seq_len", "-5"], "--seq_len: must be a positive integer"),
    (["--group_size", "0"], "--group_size: must be a positive integer"),
    (["--calib_batch_size", "0"], "--calib_batch_size: must be a positive integer"),
    (["--dataset", "no_such_text"], "--dataset 'no_such_text': not a file"),
    (["--dataset", "pileval_for_awq_benchmark"], "pass a local text file"),
    (["--quant_algo", "gptq,foo"], "unknown algorithm"),
    (["--group_size", "32", "--quant_scheme", "w_mxfp4_a_mxfp4"], "does not apply to MX"),
])
def test_bad_values_fail_before_loading(capsys, tmp_path, flags, expected):
    missing = str(tmp_path / "no_model_here")  # a load would fail with "cannot load model"
    argv = ["quantize", "--model", missing, "--quant_scheme", "w_int8_per_tensor_a_int8_per_tensor", *flags]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    assert expected in err and "cannot load model" not in err
    assert len(err.strip().splitlines()[-1]) > 10


def test_cuda_on_a_cpu_only_torch_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rc, _, err = _run(capsys, "quantize", "--model", str(tmp_path), "--quant_scheme",
                      "w_int8_per_tensor_a_int8_per_tensor", "--device", "cuda")
    assert rc == 2 and err.strip().count("\n") == 0 and "--device cuda" in err and "--device cpu" in err


def test_lm_head_excluded_by_default_and_bare_flag_quantizes_everything():
    p = build_parser()
    base = ["quantize", "--model", "m", "--quant_scheme", "w_int8_per_channel_a_int8_per_token"]
    assert build_config(p.parse_args(base)).exclude == ["*lm_head"]
    assert build_config(p.parse_args(base + ["--exclude_layers"])).exclude == []
    assert build_config(p.parse_args(base + ["--exclude_layers", "*down_proj"])).exclude == ["*down_proj"]


def test_quark_algo_list_and_group_size_on_a_per_channel_scheme():
    p = build_parser()
    cfg = build_config(p.parse_args(["quantize", "--model", "m", "--quant_scheme",
                                     "w_int8_per_channel_a_int8_per_token", "--quant_algo", "smoothquant,gptq",
                                     "--group_size", "32"]))
    assert [a.name for a in cfg.pre_quant_opt_config] == ["smoothquant"]
    assert [a.name for a in cfg.algo_config] == ["gptq"]
    w = cfg.global_quant_config.weight
    assert (w.qscheme.value, w.group_size, w.observer_cls.__name__) == ("per_group", 32, "PerGroupMinMaxObserver")


# --- end to end on a tiny model ----------------------------------------------------------------------
def test_quark_flags_are_accepted(capsys, tiny_with_tokenizer, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rc, out, err = _run(capsys, "quantize", "--model_dir", str(tiny_with_tokenizer), "--quant_scheme",
                        "w_int8_per_channel_a_int8_per_tensor", "--quant_algo", "smoothquant", "--data_type", "float32",
                        "--custom_mode", "awq", "--skip_evaluation", "--eval_ppl", "--kv_cache_dtype", "int8",
                        "--dataset", str(text), "--group_size", "32", *FAST)
    assert rc == 0, err
    assert "smooth (alpha=0.5)" in out
    assert "KV cache: 2 tensors (K after RoPE, V) quantized as int8:per_tensor" in out
    assert "perplexity" not in out and "--skip_evaluation given" in err and "--custom_mode awq" in err


def test_seq_len_beyond_the_context_warns(capsys, tiny_with_tokenizer):
    rc, out, err = _run(capsys, "quantize", "--model", str(tiny_with_tokenizer), "--quant_scheme",
                        "w_int8_per_channel_a_int8_per_token", "--num_calib_data", "1", "--seq_len", "300")
    assert rc == 0, err
    assert "--seq_len 300 is longer than the model's context (256 positions)" in err


def test_nan_in_the_checkpoint_stops_with_one_line(capsys, tmp_path):
    folder = _save(tmp_path / "nan_model", nan=True)
    rc, out, err = _run(capsys, "quantize", "--model", str(folder), "--quant_scheme",
                        "w_int8_per_channel_a_int8_per_token", *FAST)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert "non-finite weights" in last and "up_proj" in last and "quantized in" not in out


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch, tiny_with_tokenizer):
    import graphquant.cli as cli

    def broken(*a, **k):
        raise RuntimeError("something deep broke\nwith a second line")

    monkeypatch.setattr(cli, "_calibration_data", broken)
    rc, out, err = _run(capsys, "quantize", "--model", str(tiny_with_tokenizer), "--quant_scheme",
                        "w_int8_per_channel_a_int8_per_token", *FAST)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert "unexpected RuntimeError: something deep broke with a second line" in last and "GRAPHQUANT_DEBUG" in last
