"""Generation speed with a static KV cache: bf16 vs graphquant vs torchao, one H200, one run (issue 13).

    PYTHONPATH=. python benchmarks/generate_gpu.py [--layers 2] [--variants W4A16,fp8] [--no-quarot]
        [--only-quarot] [--no-torchao] [--who graphquant|torchao] [--budget-s 500] [--out ...json]
    PYTHONPATH=. python benchmarks/generate_gpu.py --merge a.json b.json --out generate_gpu.json
    PYTHONPATH=. python benchmarks/generate_gpu.py --smoke          # CPU, tiny Llama, a minute

On the H200 (about 40 s per variant; the torchao wheel travels in ``.whl``, see the device notes)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/torchao-*.whl && export PYTHONPATH=.:/tmp/site
    # everything in one run; each torchao row in its own process, killed after 150 s (a compile that never
    # finishes then becomes a row with that error, and the run goes on)
    python3 benchmarks/generate_gpu.py --isolate-s 150 --out benchmarks/results/generate_gpu.json
    # or in parts under separate device calls, then one table (a run stopped by its own limit leaves its finished
    # rows in <out>.partial, which merges the same way)
    python3 benchmarks/generate_gpu.py --who graphquant --budget-s 480 --out gq.json
    python3 benchmarks/generate_gpu.py --who torchao --no-bf16 --isolate-s 150 --out ao.json
    python3 benchmarks/generate_gpu.py --merge gq.json ao.json --out benchmarks/results/generate_gpu.json
    # run v's three calls (three builds per row take the graphquant rows to about 700 s: two calls of < 600 s)
    python3 benchmarks/generate_gpu.py --who graphquant --variants fp8,int8 --no-bf16-again --out a.json   # 421 s
    python3 benchmarks/generate_gpu.py --who graphquant --variants W8A16,W4A16 --out b.json                # 286 s
    python3 benchmarks/generate_gpu.py --who torchao --no-bf16 --variants "W4A16,fp8 dynamic" --isolate-s 95 \
        --out t.json
    python3 benchmarks/generate_gpu.py --merge a.json b.json t.json --out benchmarks/results/generate_gpu.json
    # an A/B of one code path in one run: every graphquant row, then its twin with the switch set
    python3 benchmarks/generate_gpu.py --who graphquant --variants int8 --ab graphquant.kernels.int8_mm.PREFILL_TRITON=1

torchao's rows are built with ``set_inductor_config=False``: with torchao's default (coordinate-descent tuning
of every later compile) its first compile did not finish within 235 s in three sessions; without it a row
compiles in 10-13 s (2026-11-29), except W8A16 (``Int8WeightOnlyConfig``), whose decode-step compile did not
finish within 200 s. ``--torchao-tuning`` turns torchao's setting back on; ``--torchao-eager`` skips
``torch.compile`` (its int8 rows then fail in CUDA-graph capture on torch 2.11).

Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, head_dim 128,
vocab 128256), random bf16 weights, ``--layers`` decoder layers (default 2), sdpa attention,
``lm_head`` bf16 in every variant. Every variant is a transformers model run by the same
:class:`graphquant.static_decode.StaticDecoder` (static KV cache, ``torch.compile`` decode step
replayed as a CUDA graph, compiled prefill):

- ``bf16``: a copy of the HF model itself; every speedup is over this row;
- ``graphquant``: ``gq.quantize(model, cfg, calib)`` (no lowering) -> ``qm.to_hf(kernels="always")``
  -> ``graphquant.generation.prepare(hf)`` when that module exists; each scheme also "+ QuaRot";
- ``torchao``: ``torchao.quantization.quantize_`` on a copy of the bf16 model (``lm_head`` skipped).
  torchao is not a graphquant dependency: its wheel is carried to the GPU machine; a missing
  torchao or a failing config is recorded in that row and the run goes on.

Per variant: decode step at batch 1 and 16 (cache position 256 of a 384-token cache: prompt 128
+ 256 new), graph-replayed, CUDA-event median; prefill 8 x 2048 through the static cache (compiled);
``generate`` at batch 1 and 16 (prompt 128, 256 new tokens): wall time of the whole call (prefill
included) -> tokens/s, and decode-only tokens/s; weight bytes of the decoder layers (tensor
subclasses counted by their inner tensors, a graphquant QuantLinear by its kernel layout) -> GB/s
at decode b1 and the fraction of 4.3e12 B/s;
peak CUDA memory above what was allocated before the variant was built.

The stock bf16 row is measured once more at the end of the run ("bf16 (again, end of run)", unless
``--no-bf16-again``): its ratio to the first bf16 row is the drift of the baseline within the run (2-3%
between calls on the H200), printed after the targets. Every speedup stays over the first bf16 row.

QuaRot's cost (``quarot_overhead``: the QuaRot row's per-layer decode batch-1 and prefill times over its plain
row's, the larger) is a difference of a few percent between two rows, and single rows moved by 3-5% between runs
of the same code (runs l and m). With ``--quarot-rounds R`` (default 6, an odd count rounded up to even; 0 turns
it off) a plain row's batch-1 decoder and prefill decoder stay alive while its QuaRot twin runs next, then both
are timed alternately R times, plain first in even rounds and QuaRot first in odd ones (from run r on; before,
plain always first) (``quarot_pair`` in the QuaRot raw row) and the cost comes from the medians of those rounds
(``quarot_overhead_source`` "interleaved"); the rows' own times stay as measured.

The stock bf16 row's batch-1 speed moved by 2-3% within a call and between calls (0.1636-0.1691 ms per layer in
runs p-s), which moves every decode speedup with it. With ``--speedup-rounds R`` (default 6, likewise) the
bf16 row's batch-1 decoder stays alive for the whole run, and after each later row of this process its batch-1
step and the row's are timed alternately R times (the row first in even rounds; ``bf16_pair`` in the row's raw
dict): ``decode_b1_layer_speedup`` is then the ratio of the two medians, heads subtracted
(``decode_b1_speedup_source`` "interleaved"), and the ratio of the row's own measurement to the first bf16
measurement stays as ``decode_b1_layer_speedup_own``. Rows run in their own process (``--isolate-s``: torchao's by
default) have no such rounds. Runs before 2026-12-01's run t had none.

From run v on (2026-12-01), each row in a round-robin is there with ``--builds`` (3) builds of its batch-1 decoder
and, in QuaRot's, ``--prefill-builds`` (2) of its prefill decoder (:func:`extra_builds`: quantized, prepared,
compiled and captured again from the same source model), each round timing every build and taking their mean
(``builds`` and ``*_builds_ms`` in the raw rows): builds of one row differed by 1.1-2.7% in their batch-1 step
where one build's rounds spread by 0.2-0.4% (``benchmarks/build_spread.py``), and fp8 static's QuaRot decode cost
came out between 1.1% and 6.3% over the nine pairings of three builds each (3.2% from the means).

From run t on, a decode step's time (the rows', the head's, the rounds') is the median over samples of
``Setup.step_replays`` (10) graph replays queued back to back, per replay (``graphquant.timing.back_to_back_ms``),
as ``StaticDecoder.generate`` queues its steps without waiting for the GPU. Before, each replay was timed on its own
(``decode_b{b}_ms_synced`` in the raw rows and the head, ``decode_b{b}_layer_ms_synced`` in the rows): the GPU
then idles until the CPU has submitted the graph, and in the 2026-12-01 profile the W4A16 + QuaRot step measured
that way was 9 us longer than its kernels' span while the plain step matched its own. Each round-robin
(``interleave``) also runs one unrecorded round first: in runs p-s the first decode measured after a row's build
was 2-5% faster than the later ones, for whichever row came first.

Per layer = (model time - head time) / layers, the head (embedding, final norm, lm_head of one
position, argmax, and the rotary embedding's cos / sin, which the model computes once per step for all
layers) timed on its own. Runs before 2026-11-30's run j left the rotary embedding out of the head, so
each of their per-layer times carried half of it (2 layers); ``head`` keeps that head's times too
(``*_no_rotary``). A row whose decode step compiles with Inductor options (``prepare`` names
``generation.DECODE_COMPILE_OPTIONS``; ``decode_compile_options`` in its raw row) has its own head, compiled
with the same options (``head`` in the raw row; once per set of options and process), since the options act on
the head's kernels too (Inductor's argmax over the 128256 logits: 29.6 us with the defaults); runs before
2026-11-30's run m subtracted the stock-compiled head from every row. Full 32-layer numbers = head + 32 x
per-layer: an
extrapolation, labelled so. A failure in one measurement lands in the row's ``errors``.
The rows (``rows`` in the JSON) are computed from the raw measurements (``raw``) by
:func:`build_rows`, so two runs' JSONs merge with ``--merge`` (each run measures bf16 and the head
again; the first file's are used).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from graphquant.timing import back_to_back_ms, graphed, median_ms, sync  # noqa: E402

HBM_BYTES_PER_S = 4.3e12  # H200 device-to-device copy, measured on this workplace's machines (KINDS.md)
FULL_LAYERS = 32
T0 = time.time()


@dataclasses.dataclass(frozen=True)
class Setup:
    """Model shape and workload of one run."""
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    prompt: int = 128
    new_tokens: int = 256
    batches: tuple = (1, 16)
    prefill_shape: tuple = (8, 2048)
    compile: bool = True
    cuda_graph: bool = True
    step_iters: int = 100
    step_replays: int = 10
    prefill_iters: int = 30
    generate_iters: int = 3

    @property
    def max_length(self) -> int:
        return self.prompt + self.new_tokens


SMOKE = Setup(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=512, dtype=torch.float32,
              device="cpu", prompt=16, new_tokens=16, batches=(1, 4), prefill_shape=(2, 64), compile=False,
              cuda_graph=False, step_iters=5, step_replays=1, prefill_iters=2, generate_iters=1)
SMOKE_VARIANTS = ("int8 W8A8", "W4A16 g128")


# ------------------------------------------------------------------------------------ variants
def _w8a16():
    from graphquant.config import Config, QuantizationConfig, QuantizationSpec

    return Config(global_quant_config=QuantizationConfig(
        weight=QuantizationSpec(dtype="int8", qscheme="per_channel", ch_axis=0)))


def _preset(name):
    from graphquant.config import preset

    return lambda: preset(name)


#: scheme -> (graphquant config factory, needs calibration data)
GQ_SCHEMES = {
    "fp8 static": (_preset("w_fp8_a_fp8"), True),
    "fp8 dynamic": (_preset("w_fp8_a_fp8_per_token"), False),
    "int8 W8A8": (_preset("w_int8_per_channel_a_int8_per_token"), False),
    "W8A16": (_w8a16, False),
    "W4A16 g128": (_preset("w_int4_per_group_sym"), False),
}


def _torchao_config(scheme: str, tuning: bool = False):
    """torchao 0.18's config for a scheme (names read from torchao/quantization/quant_api.py of the wheel).

    ``tuning``: torchao's ``set_inductor_config`` (default True in torchao), which turns on inductor's
    coordinate-descent tuning in all directions for every later compile of the process
    (``torchao.quantization.utils.recommended_inductor_config_setter``). Off here by default: every row then
    compiles with the same inductor settings, and with it on torchao's first compile did not finish within
    235 s on the H200 (2026-11-29)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow)

    kw = {"set_inductor_config": bool(tuning)}
    if scheme == "fp8 dynamic":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **kw)
    if scheme == "int8 W8A8":
        return Int8DynamicActivationInt8WeightConfig(**kw)
    if scheme == "W8A16":
        return Int8WeightOnlyConfig(**kw)
    if scheme == "W4A16 g128":
        # PLAIN packing needs the mslk/fbgemm kernels; tile_packed_to_4d is torch's own tinygemm
        # (torch.ops.aten._weight_int4pack_mm), see torchao's Int4PackingFormat
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d", **kw)
    raise KeyError(scheme)


#: in run order: torchao's fp8 dynamic row last, as its compile ran past 225 s without finishing on the H200
#: in two sessions (torch 2.11, torchao 0.18) and a time limit then costs no other row
TORCHAO_SCHEMES = ("W4A16 g128", "int8 W8A8", "W8A16", "fp8 dynamic")


@dataclasses.dataclass(frozen=True)
class Variant:
    who: str            # "bf16" | "graphquant" | "torchao"
    scheme: str         # "bf16" or a key of GQ_SCHEMES
    quarot: bool = False
    attention: str = "default"  # "decode": graphquant's decode attention backend; "sdpa"; "default": the library's
    compile: bool = True        # False: eager decode step, still replayed as a CUDA graph (no CPU overhead)
    tuning: bool = False        # torchao: its recommended inductor settings (coordinate-descent tuning)
    again: bool = False         # bf16: the baseline measured once more at the end of the run (its drift)
    switch: str = ""            # graphquant: "module.ATTR=value" set while the row is built and measured (--ab)

    @property
    def name(self) -> str:
        return self.scheme + (" + QuaRot" if self.quarot else "") + \
            (" + decode attention" if self.who == "bf16" and self.attention == "decode" else "") + \
            ("" if self.compile else " (eager + CUDA graph)") + (" (inductor tuning)" if self.tuning else "") + \
            (" (again, end of run)" if self.again else "") + (f" [{switch_label(self.switch)}]" if self.switch else "")


def parse_switch(spec: str) -> tuple[str, str, object]:
    """``"graphquant.kernels.int8_mm.PREFILL_TRITON=1"`` -> (module, attribute, value); the value is a Python
    literal (``1``, ``0.5``, ``None``, ``'x'``), ``true`` / ``false`` read as booleans."""
    import ast

    target, sep, text = spec.partition("=")
    module, _, attr = target.strip().rpartition(".")
    if not sep or not module or not attr:
        raise SystemExit(f"generate_gpu.py: --ab {spec!r}: write MODULE.ATTRIBUTE=VALUE, e.g. "
                         "graphquant.kernels.int8_mm.PREFILL_TRITON=1")
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return module, attr, lowered == "true"
    try:
        return module, attr, ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise SystemExit(f"generate_gpu.py: --ab {spec!r}: {text.strip()!r} is not a Python literal") from None


def switch_label(spec: str) -> str:
    """The row-name suffix of a switch: ``ATTR=value`` (several joined by ``;``)."""
    return ";".join(f"{attr}={value}" for _, attr, value in map(parse_switch, spec.split(";")))


@contextlib.contextmanager
def switched(spec: str):
    """``spec`` (see :func:`parse_switch`; several switches joined by ``;`` are set together) in force inside the
    block, the old values back afterwards. Each attribute must exist: a misspelt switch must not measure the
    default twice."""
    if not spec:
        yield
        return
    olds = []
    try:
        for one in spec.split(";"):
            module, attr, value = parse_switch(one)
            mod = importlib.import_module(module)
            if not hasattr(mod, attr):
                raise SystemExit(f"generate_gpu.py: --ab {one!r}: {module} has no {attr}")
            olds.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, old in reversed(olds):
            setattr(mod, attr, old)


def select_variants(filters=None, quarot=True, only_quarot=False, torchao=True, smoke=False,
                    who=("graphquant", "torchao"), quarot_filters=None, no_bf16=False,
                    attention="decode", torchao_eager=False, torchao_tuning=False,
                    bf16_again=False, ab=()) -> list[Variant]:
    """bf16 first (stock, then with graphquant's decode attention when ``attention == "decode"``), then
    graphquant, each scheme without and right after it with QuaRot (since 2026-11-30's run m: QuaRot's cost is the
    ratio of two rows measured about a minute apart, not five; prefill times drift by a few percent over a run),
    then torchao (last: with ``torchao_tuning`` its ``quantize_`` changes
    inductor settings for later compiles); ``filters``: substrings of scheme names; ``who``: which libraries (bf16 is kept,
    as every speedup needs it, unless ``no_bf16``: a run to merge with one that has it);
    ``quarot_filters``: of those schemes, the ones also run + QuaRot (default: all); ``attention``: the
    graphquant rows' attention ("decode": ``prepare``'s default, or "sdpa"); ``torchao_eager``: torchao rows
    without ``torch.compile`` (the decode step is still a CUDA graph), for when its compiles do not finish;
    ``torchao_tuning``: torchao rows with its recommended inductor settings (see :func:`_torchao_config`);
    ``bf16_again``: the stock bf16 row once more at the end, so the run shows how far its own baseline drifted
    (every speedup stays over the first bf16 row); ``ab``: switches (``"module.ATTR=value"``), each giving every
    graphquant row a twin measured right after it with the switch set (an A/B of one code path in one run)."""
    schemes = [s for s in GQ_SCHEMES if (not smoke or s in SMOKE_VARIANTS)
               and (not filters or any(f.lower() in s.lower() for f in filters))]
    out = [] if no_bf16 else [Variant("bf16", "bf16", attention="sdpa")]
    if not no_bf16 and attention == "decode" and "graphquant" in who:
        out.append(Variant("bf16", "bf16", attention="decode"))
    if "graphquant" in who:  # each scheme's QuaRot row right after its plain row: QuaRot's cost from neighbours
        for s in schemes:
            if not only_quarot:
                out.append(Variant("graphquant", s, attention=attention))
            if (quarot or only_quarot) and (not quarot_filters or any(f.lower() in s.lower() for f in quarot_filters)):
                out.append(Variant("graphquant", s, True, attention=attention))
    if ab:
        out = [t for v in out for t in [v] + ([dataclasses.replace(v, switch=a) for a in ab]
                                              if v.who == "graphquant" else [])]
    if "torchao" in who and torchao and not smoke and not only_quarot:
        out += [Variant("torchao", s, compile=not torchao_eager, tuning=torchao_tuning)
                for s in TORCHAO_SCHEMES if s in schemes]
    if bf16_again and not no_bf16 and len(out) > 1:
        out.append(Variant("bf16", "bf16", attention="sdpa", again=True))
    return out


# ------------------------------------------------------------------------------------ model
def llama3_8b(setup: Setup, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                      num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads, head_dim=setup.head_dim,
                      vocab_size=setup.vocab, num_hidden_layers=layers, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = LlamaForCausalLM._from_config(cfg, dtype=setup.dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def build(model, v: Variant, setup: Setup, calib):
    """A fresh transformers model for variant ``v`` (the source ``model`` is left unchanged)."""
    if v.who == "bf16":
        m = copy.deepcopy(model)
        if v.attention == "decode":
            from graphquant import decode_attention

            decode_attention.use(m)
        return m
    if v.who == "torchao":
        from torchao.quantization import quantize_

        m = copy.deepcopy(model)
        quantize_(m, _torchao_config(v.scheme, v.tuning),
                  filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
        return m
    import graphquant as gq
    from graphquant.config import QuaRotConfig

    factory, needs_calib = GQ_SCHEMES[v.scheme]
    cfg = dataclasses.replace(factory(), exclude=["*lm_head"])
    if v.quarot:
        cfg = dataclasses.replace(cfg, pre_quant_opt_config=[QuaRotConfig()])
    ex = {"input_ids": torch.randint(0, min(1000, setup.vocab), (2, 16), device=setup.device), "use_cache": False,
          "logits_to_keep": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = gq.quantize(model, cfg, calib if needs_calib else None, example_inputs=ex, check=False, progress=False)
        hf = qm.to_hf(kernels="always", device=setup.device)
    del qm
    prepare = generation_prepare()
    if prepare is not None:
        hf = prepare(hf, attention="keep" if v.attention == "sdpa" else "decode")
    hf.generation_config.eos_token_id = None
    return hf.eval()


def generation_prepare():
    """``graphquant.generation.prepare`` of the graphquant being run, or None while that module does
    not exist in this tree (an editable install elsewhere can otherwise supply another tree's module)."""
    import graphquant

    spec = importlib.util.find_spec("graphquant.generation")
    if spec is None or not spec.origin or \
            Path(spec.origin).resolve().parent != Path(graphquant.__file__).resolve().parent:
        return None
    from graphquant.generation import prepare

    return prepare


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of ``t``; tensor subclasses (torchao) count their inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def layer_weight_bytes(model) -> int:
    """Bytes of the decoder layers' weights that a decode step reads. A graphquant ``QuantLinear``
    with kernels keeps its kernel layouts (``_layouts``, built on first use or by
    ``graphquant.generation.prepare``) beside its checkpoint tensors and reads only a layout: each
    layout holds the whole weight (int4 may have two: tinygemm for decode, nibbles for prefill), so
    the largest one is counted. Call after a forward."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)

    for name, mod in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        own = [t for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
               if "inv_freq" not in n]
        layouts = getattr(mod, "_layouts", None)
        if layouts:
            for t in own:  # the checkpoint tensors stay resident but the kernels do not read them
                seen.add(id(t))
            sizes = [sum(tensor_bytes(t) for t in getattr(kw, "tensors", {}).values() if isinstance(t, torch.Tensor))
                     for kw in layouts.values()]
            total += max(sizes, default=0)
            add(getattr(mod, "bias", None) if isinstance(getattr(mod, "bias", None), torch.Tensor) else None)
        else:
            for t in own:
                add(t)
    return total


def resident_layer_bytes(model) -> int:
    """Bytes of the decoder layers' parameters and buffers (what the model holds, layouts aside)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".layers." in f".{name}" and id(t) not in seen and "inv_freq" not in name:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


# ------------------------------------------------------------------------------------ timing
def graph_replay(fn, device: str):
    """``fn`` captured as a CUDA graph (warmed up on a side stream); returns (replay, graph)."""
    return graphed(fn) if device == "cuda" else (fn, None)


class Head(torch.nn.Module):
    """What a step does outside the decoder layers: embedding, final norm, lm_head of the last position, argmax,
    and (``rotary``) the rotary embedding's cos / sin of the step's positions, which the model computes once per
    forward for all its layers (on the H200 an fp32 matmul and a copy: 4.1 us of kernel time in a bf16 decode step's
    profile; it adds 4.6 us to the head's replay in run j)."""

    def __init__(self, model, rotary: bool = True):
        super().__init__()
        self.embed, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
        self.rotary = getattr(model.model, "rotary_emb", None) if rotary else None

    def forward(self, ids, positions):
        h = self.embed(ids)
        out = self.lm_head(self.norm(h[:, -1:, :])).argmax(-1)
        if self.rotary is None:
            return out
        return (out, *self.rotary(h, positions))


@torch.no_grad()
def time_head(model, setup: Setup, options: dict | None = None) -> dict:
    """The head's times (``decode_b{b}_ms``, ``prefill_ms``; with the rotary embedding) and the same without it
    (``..._no_rotary``: how per-layer times were computed before 2026-11-30's run j). With ``options`` (the
    Inductor options a variant's decode step compiled with) only the decode times with the rotary embedding,
    compiled with them: a variant's per-layer time subtracts the head as its own step compiles it."""
    out = {}
    for rotary, suffix in ((True, ""),) + (((False, "_no_rotary"),) if options is None else ()):
        head = Head(model, rotary)
        fn = torch.compile(head, dynamic=False, options=options or None) if setup.compile else head
        for b in setup.batches:
            ids = torch.randint(0, setup.vocab, (b, 1), device=setup.device)
            pos = torch.full((1, 1), setup.max_length - setup.new_tokens // 2, device=setup.device)
            replay, g = graph_replay(lambda ids=ids, pos=pos: fn(ids, pos), setup.device) if setup.cuda_graph \
                else (lambda: fn(ids, pos), None)
            out[f"decode_b{b}_ms{suffix}"] = back_to_back_ms(replay, setup.step_iters, setup.step_replays,
                                                             setup.device)
            if setup.step_replays > 1:  # how runs before 2026-12-01's run t timed it (see the module docstring)
                out[f"decode_b{b}_ms{suffix}_synced"] = median_ms(replay, setup.step_iters, setup.device)
            del g
        if options is not None:  # no Dynamo reset here: a kept decoder (interleave) would compile again
            continue
        ids = torch.randint(0, setup.vocab, setup.prefill_shape, device=setup.device)
        pos = torch.arange(setup.prefill_shape[1], device=setup.device)[None]
        out[f"prefill_ms{suffix}"] = median_ms(lambda: fn(ids, pos), setup.prefill_iters, setup.device)
        torch._dynamo.reset()
    return out


def _decode_position(setup: Setup) -> int:
    """The cache position a decode step is timed at: the middle of the new tokens."""
    return setup.max_length - setup.new_tokens // 2 if setup.new_tokens > 1 else setup.prompt


def _attempt(r: dict, what: str, fn) -> None:
    """One measurement; a failure is recorded in ``r["errors"]`` and the others go on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report, keep going
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
        r.setdefault("errors", []).append(f"{what}: {type(e).__name__}: {first}")
        print(f"   {what} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
        torch._dynamo.reset()


@torch.no_grad()
def measure(model, setup: Setup, r: dict, keep: dict | None = None, keep_b1: dict | None = None) -> None:
    """Fill ``r`` with the raw timings of one variant (see the module docstring). ``keep``: receives the batch-1
    decoder and the prefill decoder with its prompt, for :func:`interleave` (they are not released then);
    ``keep_b1``: the batch-1 decoder only, for ``--speedup-rounds`` (:func:`interleave`)."""
    from graphquant.static_decode import StaticDecoder

    dev = setup.device
    for b in setup.batches:
        def decode(b=b):
            t = time.time()
            dec = StaticDecoder(model, b, setup.max_length, compile=setup.compile, cuda_graph=setup.cuda_graph)
            prompt = torch.randint(0, setup.vocab, (b, setup.prompt), device=dev)
            dec.generate(prompt, setup.new_tokens)  # compiles prefill and step, captures the graph
            r[f"compile_b{b}_s"] = time.time() - t
            r["decode_compile_options"] = dict(getattr(dec, "decode_compile_options", None) or {})
            r[f"decode_b{b}_ms"] = dec.time_step_ms(setup.step_iters, position=_decode_position(setup),
                                                    replays=setup.step_replays)
            if setup.step_replays > 1:  # each replay timed on its own, as before run t
                r[f"decode_b{b}_ms_synced"] = dec.time_step_ms(setup.step_iters, position=_decode_position(setup))
            walls, pre, dec_ms = [], [], []
            for _ in range(setup.generate_iters):
                sync(dev)
                t = time.perf_counter()
                dec.generate(prompt, setup.new_tokens)
                sync(dev)
                walls.append((time.perf_counter() - t) * 1e3)
                pre.append(dec.last_timing["prefill_ms"])
                dec_ms.append(dec.last_timing["decode_ms"])
            r[f"generate_b{b}_wall_ms"] = statistics.median(walls)
            r[f"generate_b{b}_prefill_ms"] = statistics.median(pre)
            r[f"generate_b{b}_decode_ms"] = statistics.median(dec_ms)
            for k in (keep, keep_b1):
                if k is not None and b == 1:
                    k["decode_b1"] = dec
            del dec
        _attempt(r, f"decode/generate batch {b}", decode)
        gc.collect()

    def prefill():
        bp, lp = setup.prefill_shape
        dec = StaticDecoder(model, bp, lp + 8, compile=setup.compile, cuda_graph=False)
        ids = torch.randint(0, setup.vocab, (bp, lp), device=dev)
        r["prefill_ms"] = dec.time_prefill_ms(ids, setup.prefill_iters)
        if keep is not None:
            keep["prefill"] = (dec, ids)
        del dec
    _attempt(r, "prefill", prefill)


#: head times per set of decode compile options, measured once per process (``time_head``)
_HEADS: dict = {}


def run_variant(model, v: Variant, setup: Setup, calib, keep: dict | None = None, reset: bool = True,
                keep_b1: dict | None = None) -> dict:
    """One row's raw measurements. ``keep`` (see :func:`measure`) and ``reset=False`` (Dynamo's caches are kept, so
    the kept prefill decoder does not compile again) serve :func:`interleave`; so does ``keep_b1`` for
    ``--speedup-rounds`` (a CUDA-graph replay needs no Dynamo cache)."""
    r = {"who": v.who, "variant": v.name, "scheme": v.scheme, "quarot": v.quarot, "attention": v.attention,
         "compiled": v.compile, "switch": v.switch}
    with switched(v.switch):
        return _run_variant(model, v, setup, calib, r, keep, reset, keep_b1)


def interleave(plain: dict, rotated: dict, setup: Setup, rounds: int, names=("plain", "quarot"),
               settle: bool = True) -> dict:
    """QuaRot's cost from alternating measurements: ``rounds`` times the plain row's batch-1 decode step and prefill,
    then the QuaRot row's, each the median of ``setup.step_iters`` / ``setup.prefill_iters`` calls on the decoders
    ``measure`` kept (what a dict lacks is not timed). Returns ``{"decode_b1_ms": {"plain": [...], "quarot": [...]},
    "prefill_ms": {...}}`` (keys ``names``): a drift of the GPU's speed over the run acts on both rows alike. The
    order alternates (plain first in even rounds, QuaRot first in odd ones: A B B A ...), so neither row is always
    the one timed right after the other. ``--speedup-rounds`` times a row's batch-1 decoder against the bf16 row's
    this way (``names=("row", "bf16")``). With ``settle`` one more round runs first and is not recorded: in runs
    p-s the first decode measured after a row's build (the GPU idle through the compile) was 2-5% faster than
    every later one, for whichever row came first. The decode rounds all run before the prefill rounds: timed
    right after a prefill (run t's first try, which alternated them round by round) a decode step was 4-7% slower
    and three times as spread as in the rounds against bf16 (0.435-0.449 against 0.4191-0.4195 ms). ``main`` rounds
    an odd count up to even: in run t a prefill timed right after the other row's took 0.3-0.6 ms (2-4%) longer
    than one timed right after its own, so with 5 rounds the plain row had the fast order three times and QuaRot
    the slow one three times, and the medians moved fp8 static's QuaRot prefill cost from about 4.3% to 6.1%.
    A kept decoder may be a list of several builds of the row (:func:`extra_builds`): each round then times every
    build, records their mean, and ``decode_b1_builds_ms`` / ``prefill_builds_ms`` keep each build's times."""
    a, b = names
    out = {"decode_b1_ms": {a: [], b: []}, "prefill_ms": {a: [], b: []}}
    position = _decode_position(setup)

    builds = {"decode_b1_ms": {a: [], b: []}, "prefill_ms": {a: [], b: []}}

    def timed(kind, kept):
        """One time per build of the row (``kept[kind]`` is one decoder, or a list of builds' decoders)."""
        got = kept[kind] if isinstance(kept[kind], list) else [kept[kind]]
        if kind == "decode_b1":
            return [d.time_step_ms(setup.step_iters, position=position, replays=setup.step_replays) for d in got]
        return [dec.time_prefill_ms(ids, setup.prefill_iters) for dec, ids in got]
    for kind in ("decode_b1", "prefill"):  # all decode rounds first: a prefill slowed the decode steps after it
        for i in range(-1 if settle else 0, rounds):
            pair = ((a, plain), (b, rotated))
            for name, kept in (pair if i % 2 == 0 else pair[::-1]):
                if kind in kept:
                    ms = timed(kind, kept)
                    if i >= 0:
                        out[f"{kind}_ms"][name].append(statistics.fmean(ms))
                        builds[f"{kind}_ms"][name].append(ms)
    for kind, per in builds.items():  # each build's times, round by round, where a row had more than one build
        if out[kind][a] and out[kind][b] and any(len(ms) > 1 for ms in per[a] + per[b]):
            out[kind.replace("_ms", "_builds_ms")] = per
    return {k: v for k, v in out.items() if v[a] and v[b]}


@torch.no_grad()
def extra_builds(model, v: Variant, setup: Setup, calib, decode: int, prefill: int) -> dict:
    """``decode`` more batch-1 decoders (compiled, CUDA graph captured) and ``prefill`` more prefill decoders, each
    on a build of its own of row ``v`` (quantized, prepared and compiled again from the same source model), for the
    round-robins (:func:`interleave`): ``{"decode_b1": [decoder, ...], "prefill": [(decoder, ids), ...]}``. On the
    H200 (``benchmarks/build_spread.py``, ``results/build_spread.json``) builds of one row differed by 1.1-2.7% in
    their batch-1 step, while one build's rounds spread by 0.2-0.4%: one build per row left that much of a
    goal check to the build."""
    from graphquant.static_decode import StaticDecoder

    out = {"decode_b1": [], "prefill": []}
    compile_ = setup.compile and v.compile
    with switched(v.switch):
        for i in range(max(decode, prefill)):
            m = build(model, v, setup, calib)
            if i < decode:
                dec = StaticDecoder(m, 1, setup.max_length, compile=compile_, cuda_graph=setup.cuda_graph,
                                    compile_prefill=False)
                dec.generate(torch.randint(0, setup.vocab, (1, setup.prompt), device=setup.device), 4)  # captures
                out["decode_b1"].append(dec)
            if i < prefill:
                bp, lp = setup.prefill_shape
                dec = StaticDecoder(m, bp, lp + 8, compile=compile_, cuda_graph=False)
                ids = torch.randint(0, setup.vocab, (bp, lp), device=setup.device)
                dec.time_prefill_ms(ids, 1)  # compiles
                out["prefill"].append((dec, ids))
            del m
    return out


def _run_variant(model, v: Variant, setup: Setup, calib, r: dict, keep: dict | None = None,
                 reset: bool = True, keep_b1: dict | None = None) -> dict:
    dev = setup.device
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        sync(dev)
        base = torch.cuda.memory_allocated()
    t = time.time()
    m = None
    try:
        m = build(model, v, setup, calib)
    except Exception as e:  # noqa: BLE001 - a variant that cannot be built is a row with its error
        traceback.print_exc()
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
        r["errors"] = [f"build: {type(e).__name__}: {first}"]
    r["build_s"] = time.time() - t
    if m is not None:
        r["attention"] = getattr(m.config, "_attn_implementation", None)  # what the model really runs
        report = getattr(m, "graphquant_prepared", None) or {}  # how many modules each prepare step changed
        if report:
            r["prepared"] = {k: len(v) for k, v in report.items() if isinstance(v, list)}
        r["resident_layer_bytes"] = resident_layer_bytes(m)
        if dev == "cuda":
            sync(dev)
            r["resident_bytes"] = torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
        measure(m, setup if v.compile else dataclasses.replace(setup, compile=False), r, keep, keep_b1)
        options = r.get("decode_compile_options")
        if options and v.compile and setup.compile:  # the head as this variant's step compiles it (time_head)
            key = repr(sorted(options.items()))
            if key not in _HEADS:
                _attempt(r, "head with the step's options",
                         lambda: _HEADS.setdefault(key, time_head(m, setup, options)))
            r["head"] = _HEADS.get(key)
        r["layer_weight_bytes"] = layer_weight_bytes(m)
        if dev == "cuda":
            r["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    del m
    if reset:
        torch._dynamo.reset()
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return r


# ------------------------------------------------------------------------------------ rows
def _ratio(a, b):
    return a / b if a is not None and b else None


def baseline(rows: list[dict]) -> dict | None:
    """The row every speedup is over: the first stock (sdpa) bf16 row, else the first bf16 row."""
    bf16 = [x for x in rows if x["who"] == "bf16"]
    return next((x for x in bf16 if x.get("attention") in (None, "sdpa")), bf16[0] if bf16 else None)


def build_rows(raw: list[dict], head: dict, layers: int, batches=(1, 16), new_tokens: int = 256) -> list[dict]:
    """The issue's rows from raw measurements: per-layer times (head subtracted), speedups over the
    bf16 row, tokens/s, weight bandwidth, QuaRot overhead, full-32-layer extrapolations."""
    rows = []
    for r in raw:
        row = {k: r[k] for k in ("who", "variant", "scheme", "quarot", "attention", "compiled", "switch") if k in r}
        own = r.get("head") or {}  # the head compiled as this row's decode step (decode keys only)
        for key in [f"decode_b{b}" for b in batches] + ["prefill"]:
            v, h = r.get(f"{key}_ms"), own.get(f"{key}_ms", head.get(f"{key}_ms"))
            if v is not None and h is not None:
                row[f"{key}_layer_ms"] = (v - h) / layers
                row[f"{key}_full32_ms_extrapolated"] = h + FULL_LAYERS * (v - h) / layers
            v, h = r.get(f"{key}_ms_synced"), own.get(f"{key}_ms_synced", head.get(f"{key}_ms_synced"))
            if v is not None and h is not None:  # each replay timed on its own (runs before t)
                row[f"{key}_layer_ms_synced"] = (v - h) / layers
        for b in batches:
            wall = r.get(f"generate_b{b}_wall_ms")
            dec = r.get(f"generate_b{b}_decode_ms")
            row[f"tokens_per_s_b{b}"] = b * new_tokens / (wall / 1e3) if wall else None
            row[f"decode_tokens_per_s_b{b}"] = b * (new_tokens - 1) / (dec / 1e3) if dec else None
            full = row.get(f"decode_b{b}_full32_ms_extrapolated")
            row[f"full32_decode_tokens_per_s_b{b}_extrapolated"] = b / (full / 1e3) if full else None
        lb = r.get("layer_weight_bytes")
        d1 = row.get("decode_b1_layer_ms")
        if lb is not None:
            row["layer_weight_bytes_per_layer"] = lb / layers
        if lb is not None and d1:
            row["weight_gb_per_s_b1"] = lb / layers / (d1 / 1e3) / 1e9
            row["weight_bandwidth_frac"] = row["weight_gb_per_s_b1"] * 1e9 / HBM_BYTES_PER_S
        else:
            row["weight_bandwidth_frac"] = None
        if r.get("resident_layer_bytes") is not None:
            row["resident_layer_bytes_per_layer"] = r["resident_layer_bytes"] / layers
        for k in ("peak_bytes", "resident_bytes", "build_s"):
            if k in r:
                row[k] = r[k]
        row["errors"] = list(r.get("errors", []))
        rows.append(row)
    bf16 = [x for x in rows if x["who"] == "bf16"]
    base = baseline(rows)
    for row in rows:
        # the same attention as this row's, so the ratio shows the Linear kernels alone
        same = next((x for x in bf16 if x.get("attention") == row.get("attention")), None)
        for key in [f"decode_b{b}" for b in batches] + ["prefill"]:
            row[f"{key}_layer_speedup"] = _ratio(base.get(f"{key}_layer_ms"), row.get(f"{key}_layer_ms")) \
                if base else None
            row[f"{key}_layer_speedup_same_attention"] = \
                _ratio(same.get(f"{key}_layer_ms"), row.get(f"{key}_layer_ms")) if same else None
        src = next((x for x in raw if x.get("who") == row["who"] and x.get("variant") == row["variant"]
                    and x.get("switch", "") == row.get("switch", "")), {})  # the row's raw measurements
        rounds = (src.get("bf16_pair") or {}).get("decode_b1_ms")
        if rounds and rounds.get("bf16") and rounds.get("row"):  # alternating rounds (interleave), heads subtracted
            h_row = (src.get("head") or {}).get("decode_b1_ms", head.get("decode_b1_ms"))
            h_base = head.get("decode_b1_ms")
            row["decode_b1_layer_speedup_own"] = row["decode_b1_layer_speedup"]
            row["decode_b1_layer_speedup"] = _ratio(statistics.median(rounds["bf16"]) - h_base,
                                                    statistics.median(rounds["row"]) - h_row)
            row["decode_b1_speedup_source"] = "interleaved"
        for b in batches:
            for k in (f"tokens_per_s_b{b}", f"full32_decode_tokens_per_s_b{b}_extrapolated"):
                row[f"{k}_vs_bf16"] = _ratio(row.get(k), base.get(k)) if base else None
        if row.get("quarot"):
            plain = next((x for x in rows if x["who"] == row["who"] and x["scheme"] == row["scheme"]
                          and not x.get("quarot") and x.get("switch", "") == row.get("switch", "")), None)
            parts = {}
            pair = src.get("quarot_pair") or {}
            for key in ("decode_b1", "prefill"):
                a = row.get(f"{key}_layer_ms")
                p = plain.get(f"{key}_layer_ms") if plain else None
                rounds = pair.get(f"{key}_ms")
                if rounds:  # alternating rounds (interleave): the medians, the row's head subtracted from both
                    h = (src.get("head") or {}).get(f"{key}_ms", head.get(f"{key}_ms"))
                    a, p = (statistics.median(rounds[w]) - h for w in ("quarot", "plain"))
                    row.setdefault("quarot_overhead_source", "interleaved")
                if a is not None and p:
                    parts[key] = a / p - 1
            row["quarot_overhead_parts"] = parts
            row["quarot_overhead"] = max(parts.values()) if parts else None
    return rows


#: per-layer decode batch-1 speedup goals over compiled bf16 (issue 13)
DECODE_GOALS = {"W4A16 g128": 2.5, "W8A16": 1.7, "int8 W8A8": 1.6, "fp8 static": 1.7, "fp8 dynamic": 1.7}
PREFILL_GOALS = {"fp8 static": 1.6, "fp8 dynamic": 1.6}
QUAROT_MAX = 0.05


def targets(rows: list[dict]) -> list[dict]:
    out = []

    def add(what, row, value, goal, higher=True):
        if value is None:
            return
        out.append({"target": what, "who": row["who"], "variant": row["variant"], "value": value, "goal": goal,
                    "pass": value >= goal if higher else value <= goal})

    for row in rows:
        if row["who"] != "graphquant":
            continue
        add("decode b1 per-layer speedup", row, row.get("decode_b1_layer_speedup"), DECODE_GOALS[row["scheme"]])
        if row.get("attention") not in (None, "sdpa"):
            add("  same, over bf16 with the same attention", row, row.get("decode_b1_layer_speedup_same_attention"),
                DECODE_GOALS[row["scheme"]])
        if row["scheme"] in PREFILL_GOALS:
            add("prefill 8x2048 per-layer speedup", row, row.get("prefill_layer_speedup"), PREFILL_GOALS[row["scheme"]])
        if row.get("quarot"):
            add("QuaRot overhead (max of decode b1, prefill)", row, row.get("quarot_overhead"), QUAROT_MAX, False)
    for row in rows:
        if row["who"] != "torchao":
            continue
        gq = next((x for x in rows if x["who"] == "graphquant" and x["scheme"] == row["scheme"]
                   and not x.get("quarot")), None)
        if gq is None:
            continue
        for key in [k for k in row if k.endswith("_layer_speedup")]:
            a, t = gq.get(key), row.get(key)
            if a is not None and t is not None:
                out.append({"target": f"graphquant >= torchao: {key}", "who": "graphquant", "variant": row["scheme"],
                            "value": a, "goal": t, "pass": a >= t})
                same = gq.get(f"{key}_same_attention")
                if same is not None and gq.get("attention") != row.get("attention"):
                    out.append({"target": "  same, each over bf16 with its own attention", "who": "graphquant",
                                "variant": row["scheme"], "value": same, "goal": t, "pass": same >= t})
            elif a is not None:
                out.append({"target": f"graphquant >= torchao: {key}", "who": "graphquant", "variant": row["scheme"],
                            "value": a, "goal": None, "pass": None,
                            "reason": "torchao did not run: " + "; ".join(row.get("errors", []))[:200]})
    return out


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def table(rows: list[dict], layers: int, batches=(1, 16)) -> str:
    b2 = batches[-1]
    head = (f"{'who':10s} {'variant':33s} {'dec b1 ms/L':>11s} {'x':>5s} {'x same':>6s} {f'dec b{b2} ms/L':>12s} "
            f"{'x':>5s} "
            f"{'prefill ms/L':>12s} {'x':>5s} {'tok/s b1':>9s} {'x':>5s} {f'tok/s b{b2}':>10s} {'x':>5s} "
            f"{'GB/s b1':>8s} {'%HBM':>5s} "
            f"{'L MB':>7s} {'peak GB':>7s} {'QuaRot+':>7s}")
    lines = [f"Per decoder layer ({layers} layers measured, head subtracted); x = speedup over bf16 (stock sdpa "
             "attention); x same = over the bf16 row with this row's attention (the Linear kernels alone); tokens/s = "
             f"generate() wall time of the {layers}-layer model, prefill included", head]
    for r in rows:
        lines.append(" ".join([
            f"{r['who']:10s}", f"{r['variant']:33s}",
            f"{_f(r.get('decode_b1_layer_ms'), '11.4f')}", f"{_f(r.get('decode_b1_layer_speedup'), '5.2f')}",
            f"{_f(r.get('decode_b1_layer_speedup_same_attention'), '6.2f')}",
            f"{_f(r.get(f'decode_b{b2}_layer_ms'), '12.4f')}", f"{_f(r.get(f'decode_b{b2}_layer_speedup'), '5.2f')}",
            f"{_f(r.get('prefill_layer_ms'), '12.3f')}", f"{_f(r.get('prefill_layer_speedup'), '5.2f')}",
            f"{_f(r.get('tokens_per_s_b1'), '9.0f')}", f"{_f(r.get('tokens_per_s_b1_vs_bf16'), '5.2f')}",
            f"{_f(r.get(f'tokens_per_s_b{b2}'), '10.0f')}", f"{_f(r.get(f'tokens_per_s_b{b2}_vs_bf16'), '5.2f')}",
            f"{_f(r.get('weight_gb_per_s_b1'), '8.0f')}",
            f"{_f(100 * r['weight_bandwidth_frac'] if r.get('weight_bandwidth_frac') else None, '5.1f')}",
            f"{_f(r['layer_weight_bytes_per_layer'] / 1e6 if r.get('layer_weight_bytes_per_layer') else None, '7.1f')}",
            f"{_f(r['peak_bytes'] / 1e9 if r.get('peak_bytes') else None, '7.2f')}",
            f"{_f(100 * r['quarot_overhead'] if r.get('quarot_overhead') is not None else None, '6.1f')}"
            + ("%" if r.get("quarot_overhead") is not None else " ")]))
    inter = [r for r in rows if r.get("decode_b1_speedup_source") == "interleaved"]
    if inter:
        lines += ["", "Decode batch-1 x above, where marked *: from alternating rounds with the bf16 row (medians); "
                  "the row's own measurement over the first bf16 measurement in brackets"]
        lines += [f"  * {r['who']:10s} {r['variant']:33s} {_f(r.get('decode_b1_layer_speedup'), '5.2f')}x "
                  f"({_f(r.get('decode_b1_layer_speedup_own'), '4.2f')}x)" for r in inter]
    lines += ["", f"Full {FULL_LAYERS}-layer model, EXTRAPOLATED (head + {FULL_LAYERS} x per-layer): "
              "decode ms per step "
              f"and tokens/s (decode only), vs bf16"]
    for r in rows:
        cells = []
        for b in batches:
            ms = r.get(f"decode_b{b}_full32_ms_extrapolated")
            tps = r.get(f"full32_decode_tokens_per_s_b{b}_extrapolated")
            x = r.get(f"full32_decode_tokens_per_s_b{b}_extrapolated_vs_bf16")
            cells.append(f"b{b}: {_f(ms, '7.3f')} ms {_f(tps, '8.0f')} tok/s ({_f(x, '4.2f')}x)")
        lines.append(f"  {r['who']:10s} {r['variant']:33s} " + "   ".join(cells))
    errs = [(r["who"], r["variant"], e) for r in rows for e in r.get("errors", [])]
    if errs:
        lines += ["", "Errors:"] + [f"  {w} {v}: {e}" for w, v, e in errs]
    return "\n".join(lines)


def targets_text(ts: list[dict]) -> str:
    lines = ["Targets (issue 13):"]
    for t in ts:
        verdict = "PASS" if t["pass"] else ("MISS" if t["pass"] is False else "n/a ")
        goal = f"goal {t['goal']:.2f}" if t["goal"] is not None else t.get("reason", "")
        lines.append(f"  {verdict}  {t['target']:48s} {t['variant']:22s} {t['value']:.3f} ({goal})")
    return "\n".join(lines)


def baseline_drift(rows: list[dict]) -> float | None:
    """Decode b1 per-layer time of the end-of-run bf16 row over the first bf16 row's, minus 1, or None."""
    first = baseline(rows)
    again = next((r for r in rows if r["who"] == "bf16" and r["variant"].endswith("(again, end of run)")), None)
    if again is None or first is again:
        return None
    a, b = again.get("decode_b1_layer_ms"), (first or {}).get("decode_b1_layer_ms")
    return a / b - 1 if a is not None and b else None


def finish(out: dict, path: str) -> None:
    """Rows, targets and the table from ``out['raw']``; print; write ``path`` atomically."""
    if any(r["who"] == "bf16" for r in out["raw"]) and out.get("head"):
        batches = tuple(out["setup"]["batches"])
        out["rows"] = build_rows(out["raw"], out["head"], out["layers"], batches, out["setup"]["new_tokens"])
        out["targets"] = targets(out["rows"])
        print()
        print(table(out["rows"], out["layers"], batches))
        print()
        print(targets_text(out["targets"]))
        if (drift := baseline_drift(out["rows"])) is not None:
            print(f"\nbf16 measured again at the end of the run: decode b1 per layer {drift:+.1%} against the first "
                  "bf16 row (the run-to-run noise the speedups carry)")
    for n in out.get("notes", []):
        print("note:", n)
    write_json(path, out)
    print(f"wrote {path} ({time.time() - T0:.0f} s)", flush=True)


def write_json(path, doc, **dumps_kw) -> None:
    """``doc`` as JSON at ``path`` (parents created), atomically: an interrupted write leaves the previous
    file as it was. Shared by the GPU benchmarks."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str, **dumps_kw))
    os.replace(tmp, p)


def variant_key(v: Variant) -> str:
    """What ``--only`` takes: the library and the row's name."""
    return f"{v.who}|{v.name}"


def run_isolated(v: Variant, args, limit_s: float) -> dict:
    """Row ``v`` measured by a child process of this script (same model shape, same flags) under a time limit:
    a compile that never finishes (torchao's W8A16 on torch 2.11) then costs ``limit_s`` and becomes a row with
    that error, and the run goes on. The child (and every process it started, e.g. inductor's compile workers)
    is killed at the limit. Its row's per-layer numbers are computed against this process's head time, as
    :func:`merge` does for rows from other runs."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="generate_gpu_") as d:
        out = Path(d) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", variant_key(v), "--who", v.who, "--no-bf16",
               "--layers", str(args.layers), "--attention", args.attention, "--out", str(out)]
        cmd += [f for f, on in (("--smoke", args.smoke), ("--torchao-eager", args.torchao_eager),
                                ("--torchao-tuning", args.torchao_tuning)) if on]
        cmd += [f"--ab={a}" for a in (args.ab or [])]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        try:
            text, _ = child.communicate(timeout=limit_s)
            error = None if child.returncode == 0 else f"its process exited with status {child.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            text, _ = child.communicate()
            error = f"did not finish within {limit_s:g} s in its own process"
        raw = json.loads(out.read_text())["raw"] if out.is_file() else []
    row = next((r for r in raw if r["who"] == v.who and r["variant"] == v.name), None)
    if row is not None and error is None:
        return row
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    last = f" (last output: {lines[-1].strip()[:200]})" if lines else ""
    return {"who": v.who, "variant": v.name, "scheme": v.scheme, "quarot": v.quarot, "attention": v.attention,
            "compiled": v.compile, "errors": [(error or "its process wrote no row") + last]}


def merge(paths: list[str]) -> dict:
    """One result from several runs: the first file's setup, head and bf16 row; later files' rows
    replace earlier ones of the same (who, variant)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in docs[0].items() if k not in ("rows", "targets", "raw")}
    out["merged_from"] = [str(p) for p in paths]
    out["notes"] = list(dict.fromkeys(n for d in docs for n in d.get("notes", [])))  # each once, in order
    raw: dict = {}
    for i, d in enumerate(docs):
        if d.get("layers") != out.get("layers"):
            raise SystemExit(f"{paths[i]} measured {d.get('layers')} layers, {paths[0]} {out.get('layers')}: "
                             "merge runs of the same --layers only")
        for r in d.get("raw", []):
            if r["who"] == "bf16" and i > 0:
                continue
            raw[(r["who"], r["variant"])] = r
    out["raw"] = list(raw.values())
    return out


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--variants", default="", help="comma-separated substrings of scheme names (default: all)")
    ap.add_argument("--no-quarot", action="store_true")
    ap.add_argument("--quarot-variants", default="", help="comma-separated substrings: only these schemes + QuaRot")
    ap.add_argument("--only-quarot", action="store_true", help="bf16 and the graphquant + QuaRot rows only")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--no-bf16-again", action="store_true",
                    help="skip the stock bf16 row measured again at the end of the run (its drift)")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bf16 row (a run to --merge after one that has it; each variant can then run in "
                         "its own process under its own time limit)")
    ap.add_argument("--attention", choices=("decode", "sdpa"), default="decode",
                    help="graphquant rows' attention: graphquant's decode backend (prepare's default; a 'bf16 + decode "
                         "attention' row is added) or stock sdpa")
    ap.add_argument("--torchao-eager", action="store_true",
                    help="torchao rows without torch.compile (decode still replayed as a CUDA graph; prefill eager)")
    ap.add_argument("--torchao-tuning", action="store_true",
                    help="torchao rows with torchao's recommended inductor settings (coordinate-descent tuning of "
                         "every later compile; off by default: the same inductor settings for every row)")
    ap.add_argument("--who", default="graphquant,torchao",
                    help="comma-separated libraries to run besides bf16: graphquant, torchao (default both)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new variant after this many seconds")
    ap.add_argument("--quarot-rounds", type=int, default=6,
                    help="QuaRot's cost from this many alternating measurements of each plain row and its QuaRot "
                         "row (0: from the two rows' own measurements)")
    ap.add_argument("--speedup-rounds", type=int, default=6,
                    help="the decode batch-1 speedup from this many alternating measurements of the bf16 row and "
                         "each later row of this process (0: from the rows' own measurements)")
    ap.add_argument("--builds", type=int, default=3,
                    help="builds of each row's batch-1 decoder timed in the round-robins, their mean taken "
                         "(1: the measured build only)")
    ap.add_argument("--prefill-builds", type=int, default=2,
                    help="builds of each plain / QuaRot row's prefill decoder timed in QuaRot's round-robin")
    ap.add_argument("--ab", action="append", metavar="MODULE.ATTR=VALUE[;MODULE.ATTR=VALUE]",
                    help="also measure every graphquant row with this switch set, right after it (repeatable), "
                         "e.g. graphquant.kernels.int8_mm.PREFILL_TRITON=1")
    ap.add_argument("--isolate", default="torchao",
                    help="comma-separated libraries whose rows each run in their own process under --isolate-s "
                         "(default torchao)")
    ap.add_argument("--isolate-s", type=float, default=0.0,
                    help="time limit of an isolated row, in seconds (0: no isolation, every row in this process)")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # "who|row name": the child of --isolate-s
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, fp32, eager: checks the script end to end")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier runs' JSONs into --out and print")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.builds < 1 or args.prefill_builds < 1:
        raise SystemExit(f"generate_gpu.py: --builds and --prefill-builds take a count >= 1; got {args.builds} and "
                         f"{args.prefill_builds}")
    if args.quarot_rounds < 0 or args.speedup_rounds < 0:
        raise SystemExit(f"generate_gpu.py: --quarot-rounds and --speedup-rounds take a count >= 0 (0 turns the "
                         f"rounds off); got {args.quarot_rounds} and {args.speedup_rounds}")
    # an even count: each row first in as many rounds as it is second (see interleave)
    args.quarot_rounds += args.quarot_rounds % 2
    args.speedup_rounds += args.speedup_rounds % 2
    default_name = "generate_gpu_smoke.json" if args.smoke else "generate_gpu.json"
    path = args.out or str(ROOT / "benchmarks" / "results" / default_name)
    if args.merge:
        finish(merge(args.merge), path)
        return
    setup = SMOKE if args.smoke else Setup()
    if setup.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("generate_gpu.py needs a CUDA GPU; use --smoke to check it on CPU")
    import transformers

    dev_name = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    setup_json = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in dataclasses.asdict(setup).items()}
    out = {"device": dev_name, "torch": torch.__version__, "transformers": transformers.__version__,
           "layers": args.layers, "setup": setup_json, "raw": [], "notes": []}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        out["torchao"] = f"not importable: {type(e).__name__}: {e}"
    print(f"device: {dev_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torchao {out['torchao']}, layers measured: {args.layers}", flush=True)
    if generation_prepare() is not None:
        out["notes"].append("graphquant rows: to_hf(kernels='always') then graphquant.generation.prepare")
    else:
        out["notes"].append("graphquant.generation not in this tree: graphquant rows use to_hf(kernels='always')")
    filters = [s.strip() for s in args.variants.split(",") if s.strip()]
    variants = select_variants(filters, quarot=not args.no_quarot, only_quarot=args.only_quarot,
                               torchao=not args.no_torchao, smoke=args.smoke,
                               who=tuple(w.strip() for w in args.who.split(",")),
                               quarot_filters=[s.strip() for s in args.quarot_variants.split(",") if s.strip()],
                               no_bf16=args.no_bf16, attention=args.attention, torchao_eager=args.torchao_eager,
                               torchao_tuning=args.torchao_tuning, bf16_again=not args.no_bf16_again,
                               ab=tuple(args.ab or ()))
    if args.only:
        variants = [v for v in variants if variant_key(v) == args.only]
        if not variants:
            raise SystemExit(f"generate_gpu.py: --only {args.only!r} names no row of this selection")
    isolated = {w.strip() for w in args.isolate.split(",") if w.strip()} if args.isolate_s > 0 and not args.only \
        else set()
    if isolated:
        out["notes"].append(f"rows of {', '.join(sorted(isolated))} each ran in their own process, limited to "
                            f"{args.isolate_s:g} s")
    if args.smoke:
        out["notes"].append("smoke run: CPU, tiny Llama in fp32, eager (no compile, no CUDA graph); the 'bf16' row "
                            "is the fp32 model; the timings check the script, not the kernels")
    model = llama3_8b(setup, args.layers)
    calib = [torch.randint(0, setup.vocab, (1, 256 if not args.smoke else 32), device=setup.device) for _ in range(2)]
    out["head"] = time_head(model, setup)
    print("head: " + ", ".join(f"{k} {v:.4f}" for k, v in out["head"].items()), flush=True)
    if args.builds > 1 or args.prefill_builds > 1:
        out["notes"].append(f"round-robins time {args.builds} builds of each row's batch-1 decoder and "
                            f"{args.prefill_builds} of each plain / QuaRot row's prefill decoder, their mean per round")
        for name in ("recompile_limit", "cache_size_limit"):  # every build's step and prefill compile again
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if args.quarot_rounds:
        out["notes"].append(f"QuaRot's cost from {args.quarot_rounds} alternating rounds of each plain row and its "
                            "QuaRot row (quarot_pair in the QuaRot rows)")
    if args.speedup_rounds:
        out["notes"].append(f"decode batch-1 speedups from {args.speedup_rounds} alternating rounds of the bf16 row "
                            "and each row (bf16_pair in the raw rows)")
    kept = None  # the previous row's decoders while its QuaRot twin runs next (--quarot-rounds)
    base_b1 = None  # the stock bf16 row's batch-1 decoder, kept for the whole run (--speedup-rounds)
    for i, v in enumerate(variants):
        if time.time() - T0 > args.budget_s:
            out["notes"].append(f"time budget {args.budget_s:.0f} s reached: {v.who} {v.name} and later not run")
            break
        print(f"[{time.time() - T0:6.1f}s] {v.who} {v.name}{' (own process)' if v.who in isolated else ''} ...",
              flush=True)
        nxt = variants[i + 1] if i + 1 < len(variants) else None
        pairs = bool(args.quarot_rounds) and v.who == "graphquant" and v.who not in isolated
        twin_next = pairs and not v.quarot and nxt is not None and nxt.quarot and nxt.who == v.who \
            and nxt.scheme == v.scheme and nxt.switch == v.switch
        paired = pairs and v.quarot and kept is not None
        keep = {} if twin_next or paired else None
        row_b1 = {} if args.speedup_rounds and v.who not in isolated else None
        if v.who in isolated:
            r = run_isolated(v, args, args.isolate_s)
        else:
            r = run_variant(model, v, setup, calib, keep=keep, reset=keep is None, keep_b1=row_b1)
            more_b1 = args.builds - 1 if row_b1 is not None or keep is not None else 0
            more_prefill = args.prefill_builds - 1 if keep is not None and "prefill" in keep else 0
            if (more_b1 or more_prefill) and not r.get("errors"):
                def add_builds():
                    more = extra_builds(model, v, setup, calib, more_b1, more_prefill)
                    for k in (keep, row_b1):
                        if k is not None and "decode_b1" in k and more["decode_b1"]:
                            k["decode_b1"] = [k["decode_b1"], *more["decode_b1"]]
                    if more["prefill"]:
                        keep["prefill"] = [keep["prefill"], *more["prefill"]]
                    r["builds"] = {"decode_b1": 1 + len(more["decode_b1"]), "prefill": 1 + len(more["prefill"])}
                _attempt(r, "more builds for the rounds", add_builds)
                if keep is None:
                    torch._dynamo.reset()
        if row_b1 and base_b1 is None and v.who == "bf16" and v.attention != "decode" and not v.again:
            base_b1 = row_b1["decode_b1"]  # the row every speedup is over (baseline())
        elif row_b1 and base_b1 is not None:
            _attempt(r, "alternating bf16 rounds",
                     lambda: r.__setitem__("bf16_pair", interleave(row_b1, {"decode_b1": base_b1}, setup,
                                                                   args.speedup_rounds, names=("row", "bf16"))))
        row_b1 = None
        if paired:
            _attempt(r, "interleaved QuaRot rounds",
                     lambda: r.__setitem__("quarot_pair", interleave(kept, keep, setup, args.quarot_rounds)))
            keep = None
            torch._dynamo.reset()
        kept = keep if twin_next else None
        gc.collect()
        out["raw"].append(r)
        print("   " + ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}" for k, val in r.items()
                                if k not in ("who", "variant", "scheme", "quarot")), flush=True)
        write_json(Path(path).with_name(Path(path).name + ".partial"), out)
    finish(out, path)
    partial = Path(path).with_name(Path(path).name + ".partial")
    if partial.exists():
        partial.unlink()


if __name__ == "__main__":
    main()
