"""The report's renderings (JSON, Graphviz, summary table) and the ``graphquant report`` command."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from graphquant.cli import main
from graphquant.patterns.base import TRANSFORMS

from conftest import REPO_ROOT, check_factorization, hadamard_module

BUILTIN_KINDS = {"norm_linear", "linear_linear", "attention_vo", "attention_qk", "residual_stream"}


# --- renderings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "phi3", "bert"])
def test_to_json_schema(tiny_analysis, arch):
    report = tiny_analysis(arch).report
    data = json.loads(report.to_json())
    assert set(data) >= {"model", "patterns"}
    assert data["model"] == type(tiny_analysis(arch).model).__name__
    assert len(data["patterns"]) == len(report.patterns)
    for p in data["patterns"]:
        assert {"kind", "modules", "applies", "blocked"} <= set(p)
        assert p["kind"] in BUILTIN_KINDS
        assert isinstance(p["modules"], list) and all(isinstance(m, str) for m in p["modules"])
        assert set(p["applies"]) <= set(TRANSFORMS)
        assert isinstance(p["blocked"], dict) and set(p["blocked"]) <= set(TRANSFORMS)
        assert all(isinstance(v, str) and v for v in p["blocked"].values())
        assert not set(p["applies"]) & set(p["blocked"])
    assert json.loads(report.to_json(indent=None)) == data


def test_to_json_records_blockers(tiny_analysis):
    data = json.loads(tiny_analysis("bert").report.to_json())
    rs = next(p for p in data["patterns"] if p["kind"] == "residual_stream")
    assert "post-LN" in rs["blocked"]["R1"]
    vo = [p for p in json.loads(tiny_analysis("phi3").report.to_json())["patterns"] if p["kind"] == "attention_vo"]
    assert vo[0]["details"]["v_slice"] == [96, 128]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_to_dot_is_a_digraph(tiny_analysis, arch):
    report = tiny_analysis(arch).report
    dot = report.to_dot()
    lines = dot.strip().splitlines()
    assert re.match(r'^digraph "[^"]+" \{$', lines[0])
    assert lines[-1] == "}"
    assert dot.count("{") == dot.count("}")
    assert dot.count('"') % 2 == 0
    edges = [ln for ln in lines if " -> " in ln]
    assert edges
    for ln in edges:
        assert re.match(r'^\s+"[^"]+" -> "[^"]+"( \[.*\])?;$', ln), ln
    # every module of every pattern is a node
    for p in report.patterns:
        if p.kind != "residual_stream":
            for m in p.modules:
                assert f'"{m}"' in dot
    assert '"residual stream"' in dot


def test_summary_table(tiny_analysis):
    report = tiny_analysis("llama").report
    text = report.summary()
    lines = text.splitlines()
    assert "LlamaForCausalLM" in lines[0]
    header = next(ln for ln in lines if ln.startswith("layer"))
    for col in ("site", *TRANSFORMS, "size", "hadamard"):
        assert col in header.split()
    for layer in (0, 1):
        rows = [ln for ln in lines if ln.split() and ln.split()[0] == str(layer)]
        assert len(rows) == 4 + 1  # 2 norm->linear, q/k, v/o, linear->linear
        assert any("down_proj" in r for r in rows) and any("o_proj" in r for r in rows)
    assert any(ln.startswith("-") and "norm -> lm_head" in ln for ln in lines)  # final norm, no layer
    assert "final norm model.norm -> lm_head" in text

    had = hadamard_module()
    if had is None:
        return
    # the Hadamard column reads e.g. "1·2^4 ok" for head_dim 16 and "1·2^7 ok" for the MLP width 128
    qk = report.of_kind("attention_qk")[0]
    assert check_factorization(qk.details["hadamard"], 16) + " ok" in text
    ll = report.of_kind("linear_linear")[0]
    assert check_factorization(ll.details["hadamard"], 128) + " ok" in text
    rs = report.residual_stream  # the residual stream's hidden size is in the R1 line
    assert "Hadamard " + check_factorization(rs.details["hadamard"], 64) + " ok" in text


def test_summary_lists_blocker_reasons(tiny_analysis):
    text = tiny_analysis("bert").report.summary()
    assert "BLOCKED" in text
    assert "post-LN" in text
    blocked = text[text.index("blocked:"):]
    assert "gelu is not positively homogeneous" in blocked
    assert str(tiny_analysis("bert").report) == text


# --- command line --------------------------------------------------------------------------------
def test_cli_report_writes_json_and_dot(tiny_saved_llama, tmp_path, capsys):
    js, dot = tmp_path / "r.json", tmp_path / "r.dot"
    assert main(["report", "--model", str(tiny_saved_llama), "--json", str(js), "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "graphquant rotatable-patterns report: LlamaForCausalLM" in out
    assert "found: 5 norm_linear, 2 linear_linear, 2 attention_vo, 2 attention_qk, 1 residual_stream" in out
    data = json.loads(js.read_text())
    assert data["model"] == "LlamaForCausalLM"
    assert sum(p["kind"] == "norm_linear" for p in data["patterns"]) == 5
    assert dot.read_text().startswith("digraph")


def test_cli_missing_path(tmp_path, capsys):
    missing = tmp_path / "does" / "not" / "exist"
    assert main(["report", "--model", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(missing) in err and "Traceback" not in err
    assert err.startswith("graphquant report: error:")


def test_cli_unreachable_hub_id(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["report", "--model", "graphquant-test/no-such-model-xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "graphquant-test/no-such-model-xyz" in err and "Traceback" not in err


def test_cli_folder_without_config(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["report", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["report"])  # --model is required
    assert info.value.code == 2
    capsys.readouterr()
    assert main(["quantize", "--model", "x"]) == 2  # no --quant_scheme
    assert "--quant_scheme is required" in capsys.readouterr().err
    assert main(["quantize", "--model", "x", "--quant_scheme", "w_int9"]) == 2
    assert "unknown" in capsys.readouterr().err.lower()
    assert main(["eval", "--model", "/no/such/dir"]) == 2


def test_python_dash_m_entry_point(tiny_saved_llama, tmp_path):
    js = tmp_path / "r.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "graphquant", "report", "--model", str(tiny_saved_llama),
                           "--json", str(js)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rotatable-patterns report: LlamaForCausalLM" in proc.stdout
    assert json.loads(js.read_text())["model"] == "LlamaForCausalLM"
    assert "Traceback" not in proc.stderr
