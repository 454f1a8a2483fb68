"""Models larger than memory: meta-device analysis, the streamed pipeline against the in-memory one,
the max_memory budget (parsing, refusal, peak RSS in a subprocess) and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import graphquant as gq
from graphquant.config import GPTQConfig, QuaRotConfig, preset
from graphquant.errors import ConfigError
from graphquant.export.shards import read_sharded
from graphquant.memory import parse_max_memory, parse_size
from graphquant.models.tiny import tiny_model
from graphquant.stream import meta_model, quantize_streamed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama8(tmp_path_factory) -> Path:
    """An 8-layer tiny Llama saved in 7 safetensors shards."""
    folder = tmp_path_factory.mktemp("llama8")
    tiny_model("llama", num_layers=8).save_pretrained(folder, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _config(scheme: str, gptq: bool = True):
    cfg = preset(scheme)
    cfg.pre_quant_opt_config = [QuaRotConfig()]
    cfg.algo_config = [GPTQConfig()] if gptq else None
    return cfg


def _calib(n: int = 3, seq: int = 64, vocab: int = 128):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


# --------------------------------------------------------------------------- capture without weights
def test_meta_model_report_and_plan_equal_the_real_ones(llama8):
    from graphquant.models.hf import load_model
    from graphquant.plan import make_plan

    real, _ = load_model(llama8)
    meta = meta_model(llama8)
    assert all(p.device.type == "meta" for p in meta.parameters())
    r_real, r_meta = gq.analyze(real), gq.analyze(meta)
    assert r_meta.to_json() == r_real.to_json()
    assert r_meta.summary() == r_real.summary()
    assert make_plan(r_meta, [QuaRotConfig()]).describe() == make_plan(r_real, [QuaRotConfig()]).describe()
    assert all(p.device.type == "meta" for p in meta.parameters())  # analysis read no weight


# --------------------------------------------------------------------------- streamed == in memory
@pytest.mark.parametrize("scheme", ["w_int8_per_channel_a_int8_per_token", "w_int8_a_int8_per_tensor_sym"])
def test_streamed_checkpoint_equals_in_memory(llama8, tmp_path, scheme):
    """W8A8 (dynamic per-token, and static per-tensor with calibrated scales) + QuaRot (R1-R4) + GPTQ:
    every tensor, config.json and graphquant_export.json equal the in-memory quantize() +
    save_pretrained() result bit for bit."""
    from graphquant.models.hf import load_model

    calib = _calib()
    model, _ = load_model(llama8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = gq.quantize(model, _config(scheme), calib, progress=False)
    qm.save_pretrained(tmp_path / "memory", source=str(llama8))
    res = quantize_streamed(llama8, _config(scheme), calib, tmp_path / "stream", max_memory="cpu=1GiB",
                            progress=False)
    a, b = read_sharded(tmp_path / "memory"), read_sharded(tmp_path / "stream")
    assert set(a) == set(b)
    assert any(k.endswith("weight_scale") for k in a) and any("R4" in k or "hadamard" in k.lower() for k in a)
    differ = [k for k in a if not _same_bits(a[k], b[k])]
    assert not differ, differ[:5]
    files = sorted(p.name for p in (tmp_path / "memory").iterdir() if not p.name.startswith("model"))
    assert files == sorted(p.name for p in (tmp_path / "stream").iterdir() if not p.name.startswith("model"))
    if (tmp_path / "memory" / "graphquant_buffers.safetensors").is_file():  # non-persistent buffers (RoPE)
        from safetensors.torch import load_file

        ba, bb = (load_file(str(tmp_path / d / "graphquant_buffers.safetensors")) for d in ("memory", "stream"))
        assert set(ba) == set(bb) and all(_same_bits(ba[k], bb[k]) for k in ba)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "memory" / name).read_text()) == json.loads((tmp_path / "stream" / name).read_text())
    m1 = json.loads((tmp_path / "memory" / "graphquant_export.json").read_text())
    m2 = json.loads((tmp_path / "stream" / "graphquant_export.json").read_text())
    m1.pop("time"), m2.pop("time")
    assert m1 == m2
    assert [u.name for u in res.units][:2] == ["embeddings", "model.layers.0"] and len(res.units) == 9
    assert res.units[-1].name == "model.layers.7+lm_head"  # the final norm is folded into lm_head: one unit
    assert any(e.get("action") == "gptq" for e in res.log)
    if scheme.endswith("per_token"):  # the streamed folder is a normal checkpoint: load it and run it
        loaded, ids = gq.load(tmp_path / "stream"), calib[0]
        with torch.no_grad():
            lq, lf = loaded(input_ids=ids).logits, model(input_ids=ids).logits
        rel = float((lq - lf).norm() / lf.norm())
        assert 0 < rel < 0.1, rel


# --------------------------------------------------------------------------- max_memory
def test_parse_max_memory_follows_accelerate():
    assert parse_max_memory("cuda=8GiB,cpu=16GiB") == {"cuda:0": 8 * 2**30, "cpu": 16 * 2**30}
    assert parse_max_memory({0: "8GB", 1: 1000, "cpu": "1.5GiB"}) == {"cuda:0": 8 * 10**9, "cuda:1": 1000,
                                                                      "cpu": int(1.5 * 2**30)}
    assert parse_max_memory("cuda:1=500MiB, disk=1TB") == {"cuda:1": 500 * 2**20, "disk": 10**12}
    assert parse_max_memory(None) == {}
    assert parse_size("512") == 512
    for bad, what in [("cuda8GiB", "no '='"), ("tpu=1GiB", "not a device"), ("cpu=lots", "not understood"),
                      ("cpu=1GiB,cpu=2GiB", "twice"), ("cpu=0GiB", "positive"), (["cpu"], "string or a dict")]:
        with pytest.raises(ConfigError, match=what):
            parse_max_memory(bad)


def test_budget_too_small_is_refused_before_reading(llama8, tmp_path):
    with pytest.raises(ConfigError, match=r"max_memory .* too small .*model.layers.7\+lm_head"):
        quantize_streamed(llama8, _config("w_int8_per_channel_a_int8_per_token"), _calib(), tmp_path / "q",
                          max_memory="cpu=100KB", progress=False)
    assert not (tmp_path / "q").exists()


def test_unsupported_streaming_is_refused(tmp_path):
    tied = tmp_path / "tied"
    tiny_model("llama", num_layers=2, tie_word_embeddings=True).save_pretrained(tied)
    with pytest.raises(ConfigError, match="tied embeddings"):
        quantize_streamed(tied, _config("w_int8_per_channel_a_int8_per_token", gptq=False), None, tmp_path / "q")
    untied = tmp_path / "untied"
    tiny_model("llama", num_layers=2).save_pretrained(untied)
    cfg = preset("w_int8_per_channel_a_int8_per_token")
    cfg.pre_quant_opt_config = ["smoothquant"]
    with pytest.raises(ConfigError, match="SmoothQuant"):
        quantize_streamed(untied, cfg, _calib(1), tmp_path / "q")
    with pytest.raises(ConfigError, match="output_dir"):
        quantize_streamed(untied, cfg, _calib(1), None)
    assert not (tmp_path / "q").exists()


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch, transformers
    import graphquant as gq
    from graphquant.stream.checkpoint import parameters_on_meta
    from graphquant.config import GPTQConfig, QuaRotConfig, preset
    from graphquant.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from graphquant.models.tiny import tiny_config
    folder, out, budget = sys.argv[1:4]
    cfg = preset("w_int8_per_channel_a_int8_per_token")
    cfg.pre_quant_opt_config = [QuaRotConfig()]
    with parameters_on_meta():  # load the code a capture needs (torch.export, the modeling file) first
        gq.analyze(transformers.AutoModelForCausalLM.from_config(tiny_config("llama", 1)))
    assert reset_peak_rss()
    base = rss_bytes()
    res = gq.quantize_streamed(folder, cfg, None, out, max_memory="cpu=" + budget, progress=False)
    print(json.dumps({"growth": peak_rss_bytes() - base, "estimate": res.estimate["total"],
                      "units": len(res.units), "reported": res.peak_rss_growth}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from Linux getrusage")
def test_streamed_peak_rss_growth_stays_under_a_budget_below_the_model_size(tmp_path):
    """A 16-layer Llama of 381 MB (float32), W8A8 (dynamic per-token) + QuaRot under cpu=320MiB: the peak RSS
    growth of the process (measured after the library code is loaded) stays below the budget. (GPTQ's
    float64 Hessians would need a model of several GB for the same margin, too slow for CI on two cores:
    its streamed result is checked against the in-memory one above, its memory in benchmarks/stream_gpu.py.)"""
    folder = tmp_path / "llama16"
    model = tiny_model("llama", num_layers=16, hidden_size=1024, intermediate_size=1024, vocab_size=4096,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="50MB")
    del model
    budget = 320 * 2**20
    assert budget < size
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(folder), str(tmp_path / "out"), "320MiB"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["units"] == 17
    assert got["estimate"] <= budget
    assert 0 < got["growth"] < budget, (got, size)
    assert abs(got["reported"] - got["growth"]) < 64 * 2**20  # StreamResult.peak_rss_growth says the same
    assert len(read_sharded(tmp_path / "out")) > 16 * 7


# --------------------------------------------------------------------------- CLI
class _CharTokenizer:
    bos_token_id, eos_token_id, pad_token_id = None, 0, 0

    def __call__(self, text, **kw):
        return {"input_ids": [3 + (ord(c) % 120) for c in text]}

    def encode(self, text, **kw):
        return self(text)["input_ids"]

    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")


def test_cli_max_memory_streams_into_output_dir(llama8, tmp_path, monkeypatch, capsys):
    from graphquant import cli
    from graphquant.models import hf

    monkeypatch.setattr(hf, "load_tokenizer", lambda *a, **k: _CharTokenizer())
    out = tmp_path / "q"
    args = ["quantize", "--model", str(llama8), "--quant_scheme", "w_int8_per_channel_a_int8_per_token",
            "--pre_quantization_optimization", "quarot", "--num_calib_data", "4", "--seq_len", "32"]
    assert cli.main(args + ["--max_memory", "cpu=1GiB"]) == 2  # no --output_dir
    assert cli.main(args + ["--max_memory", "cpu=1GiB", "--output_dir", str(out), "--eval_ppl"]) == 2
    capsys.readouterr()
    assert cli.main(args + ["--max_memory", "cpu=1GiB", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer by layer" in printed and "measured peak RSS growth" in printed
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert cli.main(args + ["--max_memory", "cpu=1KB", "--output_dir", str(tmp_path / "q2")]) != 0
    assert not (tmp_path / "q2").exists()
