"""benchmarks/generate_gpu.py: the issue-13 rows from fake timings, merging two runs, and a CPU smoke run."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "generate_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("generate_gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


HEAD = {"decode_b1_ms": 0.2, "decode_b16_ms": 0.3, "prefill_ms": 1.0}
MB = 1e6


def raw_row(who, scheme, quarot, d1, d16, pre, layer_bytes, wall1=None, **extra):
    r = {"who": who, "variant": scheme + (" + QuaRot" if quarot else ""), "scheme": scheme, "quarot": quarot,
         "decode_b1_ms": d1, "decode_b16_ms": d16, "prefill_ms": pre, "layer_weight_bytes": layer_bytes,
         "generate_b1_wall_ms": wall1, "generate_b1_decode_ms": wall1 and wall1 * 0.9,
         "generate_b16_wall_ms": wall1 and 2 * wall1, "generate_b16_decode_ms": wall1 and 1.8 * wall1}
    r.update(extra)
    return r


def fake_raw():
    # 2 layers: per-layer = (model - head) / 2
    return [
        raw_row("bf16", "bf16", False, 0.2 + 2 * 0.2, 0.3 + 2 * 0.25, 1.0 + 2 * 10.0, 2 * 436 * MB, 200.0,
                peak_bytes=5e9),
        raw_row("graphquant", "W4A16 g128", False, 0.2 + 2 * 0.07, 0.3 + 2 * 0.1, 1.0 + 2 * 9.0, 2 * 115 * MB, 100.0),
        raw_row("graphquant", "W4A16 g128", True, 0.2 + 2 * 0.0714, 0.3 + 2 * 0.1, 1.0 + 2 * 9.9, 2 * 115 * MB, 101.0),
        raw_row("graphquant", "fp8 dynamic", False, 0.2 + 2 * 0.11, 0.3 + 2 * 0.13, 1.0 + 2 * 6.0, 2 * 218 * MB, 120.0),
        raw_row("torchao", "fp8 dynamic", False, 0.2 + 2 * 0.2, 0.3 + 2 * 0.2, 1.0 + 2 * 6.5, 2 * 218 * MB, 190.0),
        {"who": "torchao", "variant": "int8 W8A8", "scheme": "int8 W8A8", "quarot": False,
         "errors": ["decode/generate batch 1: RuntimeError: _int_mm needs M > 16"]},
        raw_row("graphquant", "int8 W8A8", False, 0.2 + 2 * 0.12, None, 1.0 + 2 * 8.0, 2 * 218 * MB, 130.0),
    ]


def test_rows_have_the_issue_fields_and_right_arithmetic(bench):
    rows = bench.build_rows(fake_raw(), HEAD, layers=2, batches=(1, 16), new_tokens=256)
    by = {(r["who"], r["variant"]): r for r in rows}
    for r in rows:
        for k in ("who", "variant", "decode_b1_layer_speedup", "prefill_layer_speedup", "tokens_per_s_b1",
                  "tokens_per_s_b16", "weight_bandwidth_frac", "errors"):
            assert k in r, (r["variant"], k)
    bf16, w4 = by["bf16", "bf16"], by["graphquant", "W4A16 g128"]
    assert w4["decode_b1_layer_ms"] == pytest.approx(0.07)
    assert w4["decode_b1_layer_speedup"] == pytest.approx(0.2 / 0.07)
    assert w4["prefill_layer_speedup"] == pytest.approx(10.0 / 9.0)
    assert bf16["decode_b1_layer_speedup"] == pytest.approx(1.0)
    assert w4["tokens_per_s_b1"] == pytest.approx(256 / 0.1)
    assert w4["tokens_per_s_b16"] == pytest.approx(16 * 256 / 0.2)
    assert w4["decode_tokens_per_s_b1"] == pytest.approx(255 / 0.09)
    assert w4["weight_gb_per_s_b1"] == pytest.approx(115e6 / 0.07e-3 / 1e9)
    assert w4["weight_bandwidth_frac"] == pytest.approx(115e6 / 0.07e-3 / 4.3e12)
    assert w4["decode_b1_full32_ms_extrapolated"] == pytest.approx(0.2 + 32 * 0.07)
    assert w4["full32_decode_tokens_per_s_b1_extrapolated_vs_bf16"] == \
        pytest.approx((0.2 + 32 * 0.2) / (0.2 + 32 * 0.07))
    assert "quarot_overhead" not in w4
    rot = by["graphquant", "W4A16 g128 + QuaRot"]
    assert rot["quarot_overhead_parts"]["decode_b1"] == pytest.approx(0.0714 / 0.07 - 1)
    assert rot["quarot_overhead"] == pytest.approx(0.1)  # prefill 9.9 vs 9.0 is the larger
    broken = by["torchao", "int8 W8A8"]
    assert broken["decode_b1_layer_speedup"] is None and broken["weight_bandwidth_frac"] is None
    assert broken["errors"] and "_int_mm" in broken["errors"][0]
    assert by["graphquant", "int8 W8A8"]["decode_b16_layer_speedup"] is None  # a missing timing stays missing


def test_a_row_with_its_own_head_subtracts_it(bench):
    """A step compiled with other Inductor options has the head timed as it compiles it: its decode per-layer time
    and 32-layer extrapolation use that head, its prefill (compiled with the defaults) the run's."""
    raw = fake_raw()
    own = {"decode_b1_ms": 0.15, "decode_b16_ms": 0.28}
    raw[1] = dict(raw[1], head=own, decode_b1_ms=0.15 + 2 * 0.07)
    w4 = next(r for r in bench.build_rows(raw, HEAD, layers=2) if r["variant"] == "W4A16 g128")
    assert w4["decode_b1_layer_ms"] == pytest.approx(0.07)
    assert w4["decode_b16_layer_ms"] == pytest.approx((0.3 + 2 * 0.1 - 0.28) / 2)
    assert w4["prefill_layer_ms"] == pytest.approx(9.0)
    assert w4["decode_b1_full32_ms_extrapolated"] == pytest.approx(0.15 + 32 * 0.07)


def test_interleaved_rounds_give_quarot_its_cost(bench):
    """``--quarot-rounds``: the plain row and its QuaRot twin timed alternately (plain first, then QuaRot first, ...);
    the cost comes from the rounds' medians (head subtracted), not from the two rows' own times, which here disagree (a drift between them)."""
    calls = []

    class Dec:
        def __init__(self, name, step, pre):
            self.name, self.step, self.pre = name, step, pre

        def time_step_ms(self, iters, position=None, replays=1):
            calls.append((self.name, "step"))
            return self.step

        def time_prefill_ms(self, ids, iters):
            calls.append((self.name, "prefill"))
            return self.pre

    setup = bench.SMOKE
    plain = {"decode_b1": Dec("plain", 0.2 + 2 * 0.070, None), "prefill": (Dec("plain", None, 1.0 + 2 * 9.0), None)}
    rotated = {"decode_b1": Dec("rot", 0.2 + 2 * 0.0714, None), "prefill": (Dec("rot", None, 1.0 + 2 * 9.18), None)}
    pair = bench.interleave(plain, rotated, setup, rounds=3)
    # an unrecorded settling round, then the order alternates round by round; every decode round before the prefills
    order = ["rot", "plain", "plain", "rot", "rot", "plain", "plain", "rot"]
    assert calls == [(n, "step") for n in order] + [(n, "prefill") for n in order]
    assert pair["decode_b1_ms"]["quarot"] == [0.2 + 2 * 0.0714] * 3 and len(pair["prefill_ms"]["plain"]) == 3
    raw = fake_raw()
    raw[2] = dict(raw[2], prefill_ms=1.0 + 2 * 9.9, quarot_pair=pair)  # its own prefill 10% over the plain row's
    rot = next(r for r in bench.build_rows(raw, HEAD, layers=2) if r["variant"] == "W4A16 g128 + QuaRot")
    assert rot["quarot_overhead_source"] == "interleaved"
    assert rot["quarot_overhead_parts"]["decode_b1"] == pytest.approx(0.0714 / 0.07 - 1)
    assert rot["quarot_overhead_parts"]["prefill"] == pytest.approx(0.02)
    assert rot["quarot_overhead"] == pytest.approx(0.02)
    assert rot["prefill_layer_ms"] == pytest.approx(9.9)  # the row's own time stays as measured


def test_targets_pass_miss_and_torchao_comparison(bench):
    rows = bench.build_rows(fake_raw(), HEAD, layers=2, batches=(1, 16), new_tokens=256)
    ts = bench.targets(rows)
    got = {(t["target"], t["variant"]): t for t in ts}
    assert got["decode b1 per-layer speedup", "W4A16 g128"]["pass"] is True      # 2.86 >= 2.5
    assert got["decode b1 per-layer speedup", "fp8 dynamic"]["pass"] is True     # 1.82 >= 1.7
    assert got["prefill 8x2048 per-layer speedup", "fp8 dynamic"]["pass"] is True  # 1.67 >= 1.6
    assert got["decode b1 per-layer speedup", "int8 W8A8"]["pass"] is True       # 1.67 >= 1.6
    assert got["QuaRot overhead (max of decode b1, prefill)", "W4A16 g128 + QuaRot"]["pass"] is False  # 10%
    assert got["graphquant >= torchao: decode_b1_layer_speedup", "fp8 dynamic"]["pass"] is True
    assert got["graphquant >= torchao: prefill_layer_speedup", "fp8 dynamic"]["pass"] is True
    no_ao = got["graphquant >= torchao: decode_b1_layer_speedup", "int8 W8A8"]
    assert no_ao["pass"] is None and "_int_mm" in no_ao["reason"]
    text = bench.table(rows, 2) + "\n" + bench.targets_text(ts)
    assert "EXTRAPOLATED" in text and "W4A16 g128 + QuaRot" in text and "MISS" in text and "PASS" in text
    assert "_int_mm needs M > 16" in text


def test_merge_two_runs_and_variant_selection(bench, tmp_path):
    raw = fake_raw()
    setup = {"batches": [1, 16], "new_tokens": 256}
    a = {"layers": 2, "setup": setup, "head": HEAD, "raw": [raw[0], raw[1], raw[3]], "notes": ["a"]}
    other_bf16 = dict(raw[0], decode_b1_ms=99.0)
    b = {"layers": 2, "setup": setup, "head": {**HEAD, "decode_b1_ms": 5.0}, "raw": [other_bf16, raw[2]],
         "notes": ["b"]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "merged.json"
    bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["head"] == HEAD and doc["notes"] == ["a", "b"]
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"bf16", "W4A16 g128", "fp8 dynamic", "W4A16 g128 + QuaRot"}
    assert rows["bf16"]["decode_b1_layer_ms"] == pytest.approx(0.2)  # the first run's bf16 and head
    assert rows["W4A16 g128 + QuaRot"]["quarot_overhead"] == pytest.approx(0.1)  # plain row from the other run
    (tmp_path / "c.json").write_text(json.dumps({**b, "layers": 4}))
    with pytest.raises(SystemExit, match="same --layers"):
        bench.merge([str(tmp_path / "a.json"), str(tmp_path / "c.json")])

    names = [(v.who, v.name) for v in bench.select_variants(["W4A16", "fp8 dyn"])]
    assert names == [("bf16", "bf16"), ("bf16", "bf16 + decode attention"),  # each QuaRot row after its plain one
                     ("graphquant", "fp8 dynamic"), ("graphquant", "fp8 dynamic + QuaRot"),
                     ("graphquant", "W4A16 g128"), ("graphquant", "W4A16 g128 + QuaRot"),
                     ("torchao", "W4A16 g128"), ("torchao", "fp8 dynamic")]  # torchao's fp8 dynamic last
    only = bench.select_variants(only_quarot=True)
    assert [v.who for v in only[:2]] == ["bf16"] * 2 and all(v.quarot for v in only[2:]) and len(only) == 7
    assert all(v.attention == "decode" for v in only[1:])
    plain = bench.select_variants(["int8"], attention="sdpa", quarot=False, torchao=False)
    assert [(v.name, v.attention) for v in plain] == [("bf16", "sdpa"), ("int8 W8A8", "sdpa")]
    assert all(v.who != "torchao" for v in bench.select_variants(quarot=False, torchao=False))
    ao = bench.select_variants(who=("torchao",))
    assert [v.who for v in ao] == ["bf16"] + ["torchao"] * 4
    assert [v.name for v in bench.select_variants(who=("torchao",), no_bf16=True)] == list(bench.TORCHAO_SCHEMES)
    again = bench.select_variants(["int8"], quarot=False, torchao=False, bf16_again=True)
    assert [(v.who, v.name) for v in again] == [("bf16", "bf16"), ("bf16", "bf16 + decode attention"),
                                                ("graphquant", "int8 W8A8"), ("bf16", "bf16 (again, end of run)")]
    assert not any(v.again for v in bench.select_variants(["int8"], who=("torchao",), no_bf16=True, bf16_again=True))
    eager = bench.select_variants(["int8"], who=("torchao",), no_bf16=True, torchao_eager=True)
    assert [(v.name, v.compile) for v in eager] == [("int8 W8A8 (eager + CUDA graph)", False)]


def test_alternating_bf16_rounds_give_the_decode_speedup(bench):
    """``--speedup-rounds``: the bf16 row's batch-1 decoder and a later row's timed alternately (the row first,
    then bf16 first, ...); ``decode_b1_layer_speedup`` is the ratio of the rounds' medians (heads subtracted), the
    row's own measurement over the first bf16 measurement stays as ``decode_b1_layer_speedup_own``."""
    calls = []

    class Dec:
        def __init__(self, name, steps):
            self.name, self.steps = name, iter(steps)

        def time_step_ms(self, iters, position=None, replays=1):
            calls.append((self.name, replays))
            return next(self.steps)

    # bf16 drifts slower over the rounds (0.2 -> 0.21 ms per layer); the row stays at 0.08; the first measurement
    # of each (the settling round) is fast and must not count
    base = Dec("bf16", [0.1, 0.2 + 2 * 0.20, 0.2 + 2 * 0.21, 0.2 + 2 * 0.21])
    row = Dec("row", [0.1] + [0.2 + 2 * 0.08] * 3)
    setup = bench.dataclasses.replace(bench.SMOKE, step_replays=7)
    pair = bench.interleave({"decode_b1": row}, {"decode_b1": base}, setup, rounds=3, names=("row", "bf16"))
    assert calls == [(n, 7) for n in ("bf16", "row", "row", "bf16", "bf16", "row", "row", "bf16")]
    assert pair["decode_b1_ms"]["bf16"] == [0.2 + 2 * 0.20, 0.2 + 2 * 0.21, 0.2 + 2 * 0.21]
    assert pair["decode_b1_ms"]["row"] == [0.2 + 2 * 0.08] * 3
    raw = fake_raw()
    raw[1] = dict(raw[1], bf16_pair=pair)  # W4A16: its own 0.07 ms per layer against the first bf16's 0.2
    rows = bench.build_rows(raw, HEAD, layers=2)
    w4 = next(r for r in rows if r["variant"] == "W4A16 g128")
    assert w4["decode_b1_speedup_source"] == "interleaved"
    assert w4["decode_b1_layer_speedup"] == pytest.approx(0.21 / 0.08)
    assert w4["decode_b1_layer_speedup_own"] == pytest.approx(0.2 / 0.07)
    assert w4["decode_b1_layer_ms"] == pytest.approx(0.07)  # the row's own time stays as measured
    fp8 = next(r for r in rows if r["variant"] == "fp8 dynamic" and r["who"] == "graphquant")
    assert "decode_b1_speedup_source" not in fp8 and fp8["decode_b1_layer_speedup"] == pytest.approx(0.2 / 0.11)
    assert "* graphquant W4A16 g128" in bench.table(rows, 2)


def test_negative_round_counts_are_refused_with_a_one_line_message(bench, tmp_path):
    for flag in ("--quarot-rounds", "--speedup-rounds"):
        with pytest.raises(SystemExit, match="take a count >= 0"):
            bench.main(["--smoke", flag, "-1", "--out", str(tmp_path / "x.json")])
    for flag in ("--builds", "--prefill-builds"):
        with pytest.raises(SystemExit, match="take a count >= 1"):
            bench.main(["--smoke", flag, "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_rounds_time_every_build_of_a_row_and_record_their_mean(bench):
    """A kept decoder may be a list of builds (``--builds``): each round times every build of both rows, records
    their mean, and keeps each build's time; the cost then comes from the means, so one slow build moves it by
    its share only."""
    class Dec:
        def __init__(self, step):
            self.step = step

        def time_step_ms(self, iters, position=None, replays=1):
            return self.step

    plain = {"decode_b1": [Dec(1.0), Dec(1.1), Dec(1.2)]}
    rotated = {"decode_b1": [Dec(1.3), Dec(1.1)]}
    pair = bench.interleave(plain, rotated, bench.SMOKE, rounds=2)
    assert pair["decode_b1_ms"] == {"plain": [pytest.approx(1.1)] * 2, "quarot": [pytest.approx(1.2)] * 2}
    assert pair["decode_b1_builds_ms"] == {"plain": [[1.0, 1.1, 1.2]] * 2, "quarot": [[1.3, 1.1]] * 2}
    one = bench.interleave({"decode_b1": Dec(1.0)}, {"decode_b1": [Dec(2.0)]}, bench.SMOKE, rounds=2)
    assert set(one) == {"decode_b1_ms"} and one["decode_b1_ms"]["quarot"] == [2.0, 2.0]  # one build: no per-build key


def test_smoke_run_on_cpu(bench, tmp_path):
    """The whole script on a tiny fp32 Llama: bf16 + graphquant int8 W8A8 with and without QuaRot, every row
    measured; the graphquant rows each in their own process (``--isolate``), as torchao's run on the GPU."""
    out = tmp_path / "smoke.json"
    bench.main(["--smoke", "--variants", "int8", "--isolate", "graphquant", "--isolate-s", "600", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert [(r["who"], r["variant"]) for r in doc["rows"]] == [
        ("bf16", "bf16"), ("bf16", "bf16 + decode attention"), ("graphquant", "int8 W8A8"),
        ("graphquant", "int8 W8A8 + QuaRot"), ("bf16", "bf16 (again, end of run)")]
    # the backend is set (CPU decode calls then go to sdpa); prepare switches only CUDA models
    assert [r["attention"] for r in doc["rows"]] == ["sdpa", "graphquant_decode", "sdpa", "graphquant_sdpa", "sdpa"]
    assert bench.baseline_drift(doc["rows"]) is not None
    doc["rows"].pop(1)
    for r in doc["rows"]:
        assert r["errors"] == [], r
        # per-layer times are differences of two timings (model - head): on a busy CPU they can come out at or
        # below zero, so only their presence is checked; tokens/s are whole-call timings
        assert r["tokens_per_s_b1"] > 0 and r["tokens_per_s_b4"] > 0
        for key in ("decode_b1_layer_speedup", "prefill_layer_speedup", "weight_bandwidth_frac"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
    w8, fp32 = doc["rows"][1], doc["rows"][0]
    assert doc["rows"][2]["quarot_overhead"] is not None
    # int8 weights + per-channel scales: about 4x below fp32 (norm weights stay fp32)
    assert fp32["layer_weight_bytes_per_layer"] / 4.2 < w8["layer_weight_bytes_per_layer"] \
        < fp32["layer_weight_bytes_per_layer"] / 3.5
    assert not (tmp_path / "smoke.json.partial").exists()


def test_smoke_run_times_each_quarot_row_against_its_plain_row_in_rounds(bench, tmp_path):
    """In one process a plain row's decoders stay alive while its QuaRot twin runs, then both are timed in
    alternating rounds (``--quarot-rounds``)."""
    out = tmp_path / "pairs.json"
    bench.main(["--smoke", "--variants", "int8", "--no-bf16-again", "--quarot-rounds", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    rot = next(r for r in doc["raw"] if r["variant"] == "int8 W8A8 + QuaRot")
    assert not rot.get("errors"), rot.get("errors")
    assert {k: [len(v) for v in d.values()] for k, d in rot["quarot_pair"].items()} == \
        {"decode_b1_ms": [2, 2], "prefill_ms": [2, 2], "decode_b1_builds_ms": [2, 2], "prefill_builds_ms": [2, 2]}
    # --builds 3 / --prefill-builds 2 (the defaults): every round timed each build, and recorded their mean
    assert rot["builds"] == {"decode_b1": 3, "prefill": 2}
    for kind, n in (("decode_b1", 3), ("prefill", 2)):
        for name in ("plain", "quarot"):
            per = rot["quarot_pair"][f"{kind}_builds_ms"][name]
            assert all(len(ms) == n for ms in per), per
            assert rot["quarot_pair"][f"{kind}_ms"][name] == pytest.approx([sum(ms) / n for ms in per])
    row = next(r for r in doc["rows"] if r["variant"] == "int8 W8A8 + QuaRot")
    assert row["quarot_overhead_source"] == "interleaved" and row["quarot_overhead"] is not None
    # (1 round asked: rounded up to 2, so that each row is first as often as second)
    # every row after the first bf16 one was also timed against it in alternating rounds (--speedup-rounds 6)
    later = [r for r in doc["raw"] if r["variant"] != "bf16"]
    assert later and all(len(r["bf16_pair"]["decode_b1_ms"]["row"]) == 6 for r in later), later
    assert all(r.get("decode_b1_speedup_source") == "interleaved" for r in doc["rows"] if r["variant"] != "bf16")
    # the raw row says what prepare changed (on CPU no decode kernel stores the SiLU·mul: step 5 changes nothing)
    assert rot["prepared"]["fused"] > 0 and rot["prepared"]["glu_into_gate_up"] == 0, rot["prepared"]


def test_ab_switch_twins_each_graphquant_row(bench, monkeypatch):
    """``--ab MODULE.ATTR=VALUE``: every graphquant row gets a twin right after it, built and measured with the
    switch set (and the old value back afterwards); a QuaRot twin's overhead is over the twin without QuaRot."""
    from graphquant.kernels import int8_mm

    default = int8_mm.PREFILL_TRITON
    flip = int(not default)
    vs = bench.select_variants(["int8"], who=("graphquant",),
                               ab=(f"graphquant.kernels.int8_mm.PREFILL_TRITON={flip}",))
    assert [v.name for v in vs] == ["bf16", "bf16 + decode attention", "int8 W8A8", f"int8 W8A8 [PREFILL_TRITON={flip}]",
                                    "int8 W8A8 + QuaRot", f"int8 W8A8 + QuaRot [PREFILL_TRITON={flip}]"]
    seen = []
    monkeypatch.setattr(bench, "_run_variant", lambda model, v, setup, calib, r, *kept: seen.append(
        int8_mm.PREFILL_TRITON) or r)
    for v in vs[2:4]:
        assert bench.run_variant(None, v, bench.SMOKE, None)["switch"] == v.switch
    assert seen == [default, flip] and int8_mm.PREFILL_TRITON is default
    assert bench.parse_switch("a.b.C=true") == ("a.b", "C", True)
    for bad in ("PREFILL_TRITON=1", "graphquant.kernels.int8_mm.PREFILL_TRITON=not a literal"):
        with pytest.raises(SystemExit):
            bench.parse_switch(bad)
    with pytest.raises(SystemExit, match="has no"):
        with bench.switched("graphquant.kernels.int8_mm.NO_SUCH_SWITCH=1"):
            pass
    from graphquant.kernels import quant_triton as QT

    both = f"graphquant.kernels.int8_mm.PREFILL_TRITON={flip};graphquant.kernels.quant_triton.FAST_CODES=1"
    assert bench.switch_label(both) == f"PREFILL_TRITON={flip};FAST_CODES=1"
    fast = QT.FAST_CODES
    with bench.switched(both):  # set together, both restored afterwards
        assert int8_mm.PREFILL_TRITON == flip and QT.FAST_CODES == 1
    assert int8_mm.PREFILL_TRITON is default and QT.FAST_CODES is fast
    with pytest.raises(SystemExit, match="has no"):  # a misspelt second switch: the first one is restored too
        with bench.switched(f"graphquant.kernels.int8_mm.PREFILL_TRITON={flip};graphquant.kernels.int8_mm.NOPE=1"):
            pass
    assert int8_mm.PREFILL_TRITON is default
    raw = [raw_row("bf16", "bf16", False, 0.6, 0.8, 21.0, 2 * 436 * MB, 200.0),
           dict(raw_row("graphquant", "int8 W8A8", False, 0.4, 0.6, 17.0, 2 * 218 * MB, 130.0), switch=""),
           dict(raw_row("graphquant", "int8 W8A8", False, 0.4, 0.6, 13.0, 2 * 218 * MB, 130.0), switch="m.X=1",
                variant="int8 W8A8 [X=1]"),
           dict(raw_row("graphquant", "int8 W8A8", True, 0.4, 0.6, 14.0, 2 * 218 * MB, 130.0), switch="m.X=1",
                variant="int8 W8A8 + QuaRot [X=1]")]
    rows = {r["variant"]: r for r in bench.build_rows(raw, HEAD, layers=2)}
    # (14 - 1) / 2 over (13 - 1) / 2: the twin with the same switch, not the plain row's (17 - 1) / 2
    assert rows["int8 W8A8 + QuaRot [X=1]"]["quarot_overhead_parts"]["prefill"] == pytest.approx(13 / 12 - 1)


def test_the_end_of_run_bf16_row_gives_the_baseline_drift_not_the_speedups(bench):
    raw = fake_raw()
    again = dict(raw[0], variant="bf16 (again, end of run)")
    again["decode_b1_ms"] = raw[0]["decode_b1_ms"] + 2 * 0.01  # 5% slower per layer (0.2 -> 0.21)
    rows = bench.build_rows(raw + [again], HEAD, layers=2, batches=(1, 16), new_tokens=256)
    assert bench.baseline_drift(rows) == pytest.approx(0.05)
    assert rows[-1]["decode_b1_layer_speedup"] == pytest.approx(0.2 / 0.21)
    assert [r["decode_b1_layer_speedup"] for r in rows[:-1]] == \
        [r["decode_b1_layer_speedup"] for r in bench.build_rows(raw, HEAD, 2, (1, 16), 256)]
    assert bench.baseline_drift(rows[:-1]) is None


def test_same_attention_speedups(bench):
    """Rows on graphquant's decode attention get a second speedup over the bf16 row with the same attention;
    the issue's speedup stays over stock bf16."""
    raw = fake_raw()
    for r in raw:
        r["attention"] = "sdpa" if r["who"] != "graphquant" else "graphquant_decode"
    raw.insert(1, raw_row("bf16", "bf16", False, 0.2 + 2 * 0.18, 0.3 + 2 * 0.24, 1.0 + 2 * 10.0, 2 * 436 * MB,
                          190.0, attention="graphquant_decode"))
    raw[1]["variant"] = "bf16 + decode attention"
    rows = bench.build_rows(raw, HEAD, layers=2, batches=(1, 16), new_tokens=256)
    by = {(r["who"], r["variant"]): r for r in rows}
    w4 = by["graphquant", "W4A16 g128"]
    assert w4["decode_b1_layer_speedup"] == pytest.approx(0.2 / 0.07)
    assert w4["decode_b1_layer_speedup_same_attention"] == pytest.approx(0.18 / 0.07)
    assert by["bf16", "bf16"]["decode_b1_layer_speedup"] == pytest.approx(1.0)
    assert by["bf16", "bf16 + decode attention"]["decode_b1_layer_speedup"] == pytest.approx(0.2 / 0.18)
    assert by["torchao", "fp8 dynamic"]["decode_b1_layer_speedup_same_attention"] == pytest.approx(1.0)
    ts = bench.targets(rows)
    got = {(t["target"].strip(), t["variant"]): t for t in ts}
    assert got["same, over bf16 with the same attention", "W4A16 g128"]["value"] == pytest.approx(0.18 / 0.07)
    vs_ao = [t for t in ts if t["target"].strip() == "same, each over bf16 with its own attention"]
    assert [t["variant"] for t in vs_ao] == ["fp8 dynamic"] * 3  # decode b1, b16, prefill
    assert vs_ao[0]["value"] == pytest.approx(0.18 / 0.11) and vs_ao[0]["goal"] == pytest.approx(1.0)
    assert "x same" in bench.table(rows, 2)


def test_torchao_rows_compile_with_the_same_inductor_settings_unless_asked(bench, monkeypatch):
    """torchao's configs default to set_inductor_config=True (coordinate-descent tuning of every later compile);
    the benchmark turns it off unless --torchao-tuning (a stand-in torchao module records the arguments)."""
    import types

    made = []

    def config(name):
        return lambda **kw: made.append((name, kw)) or name

    fake = types.ModuleType("torchao.quantization")
    for n in ("Float8DynamicActivationFloat8WeightConfig", "Int4WeightOnlyConfig",
              "Int8DynamicActivationInt8WeightConfig", "Int8WeightOnlyConfig"):
        setattr(fake, n, config(n))
    fake.PerRow = lambda: "row"
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    for scheme in bench.TORCHAO_SCHEMES:
        bench._torchao_config(scheme)
    assert len(made) == 4 and all(kw["set_inductor_config"] is False for _, kw in made)
    bench._torchao_config("W8A16", tuning=True)
    assert made[-1] == ("Int8WeightOnlyConfig", {"set_inductor_config": True})
    tuned = bench.select_variants(["W8A16"], who=("torchao",), no_bf16=True, torchao_tuning=True)
    assert [(v.name, v.tuning) for v in tuned] == [("W8A16 (inductor tuning)", True)]


def test_an_isolated_row_past_its_time_limit_becomes_an_error_row(bench, tmp_path):
    """A row whose process does not finish in time (torchao's W8A16 compile on the H200) is killed and recorded
    with the reason; the run still writes its table."""
    out = tmp_path / "limit.json"
    bench.main(["--smoke", "--variants", "int8", "--no-quarot", "--isolate", "graphquant", "--isolate-s", "0.5",
                "--out", str(out)])
    doc = json.loads(out.read_text())
    row = next(r for r in doc["rows"] if r["who"] == "graphquant")
    assert row["variant"] == "int8 W8A8" and len(row["errors"]) == 1, row
    assert row["errors"][0].startswith("did not finish within 0.5 s in its own process"), row["errors"]
    assert any("own process" in n for n in doc["notes"])
    with pytest.raises(SystemExit, match="names no row"):
        bench.main(["--smoke", "--only", "graphquant|no such row", "--out", str(tmp_path / "x.json")])
