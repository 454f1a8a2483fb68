"""Decode kernels' machine code for an H100/H200 (sm_90), without a GPU: registers, spills and the instruction
mix of the main loop per weight element.

At decode batch 1 a weight-only GEMV that runs on CUDA cores is bound by the instructions it issues as much as
by memory: the H200 issues about 128 lane-instructions per clock per SM (33 T/s over 132 SMs), and the
Llama-3-8B gate|up weight holds 117 M elements, so every instruction per element costs about 3.5 us there
against 14.5 us to stream the int4 weight (27 us for int8). This script compiles each kernel the way its launch
wrapper would (Triton's sm_90 target, 16-divisible pointers and sizes, as Triton specializes them at launch),
disassembles it with the ``nvdisasm`` Triton ships, finds the main loop (the body of the backward branch) and
prints, per kernel and tile: registers per thread, stack / local memory (spills), the kernel's instructions, the
loop's instruction count per weight element for one thread, and its most frequent opcodes. A kernel change that
cuts the count can be judged before GPU time is spent on it; the GPU still decides (``benchmarks/decode_kernels.py``).

    python benchmarks/kernel_sass.py [--out benchmarks/results/kernel_sass.json]

Needs Triton with its NVIDIA backend (the ``triton`` wheel); no CUDA device.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: pointer and size arguments Triton specializes as 16-divisible at a launch on the Llama-3-8B shapes
_DIVISIBLE = {"A", "P", "RS", "XS", "B", "SW", "ZW", "SA", "BIAS", "C", "OUT", "COUNT", "N", "K", "Q", "G", "stride_am", "stride_bn",
              "stride_cm", "stride_sw", "X", "x_ptr", "a_ptr", "y_ptr", "M0", "h_ptr"}


def specs():
    """(name, kernel, pointer dtypes, constexprs, launch options, weight elements per thread per loop step)."""
    from graphquant.kernels import quant_triton as QT

    out = []
    # gemv_packed at batch 1 with the H200 table's tiles (gemv_tuned.json): W8A16 and W4A16
    for w_kind, per, tiles in ((QT.W_INT8, 4, ((16, 128, 1, False), (32, 128, 1, False), (32, 128, 2, True))),
                               (QT.W_INT4, 8, ((16, 128, 1, False), (32, 128, 1, False)))):
        for bn, bq, split, prefetch in tiles:
            name = f"gemv_packed {'W8A16' if w_kind == QT.W_INT8 else 'W4A16'} BN{bn} BQ{bq} split{split}" + \
                   (" prefetch" if prefetch else "")
            ptrs = {"A": "bf16", "B": "i32", "SW": "fp32", "ZW": "u8", "BIAS": "bf16", "C": "fp32" if split > 1
                    else "bf16", "OUT": "bf16", "COUNT": "i32"}
            const = dict(GROUP=128, W_KIND=w_kind, W_SCALE=2 if w_kind == QT.W_INT4 else 1, HAS_ZERO=False,
                         HAS_BIAS=False, BLOCK_M=1, BLOCK_N=bn, BLOCK_Q=bq, SPLIT_K=split, PREFETCH=prefetch,
                         LAST_SUMS=split > 1)
            out.append((name, QT.gemv_packed_kernel, ptrs, const, dict(num_warps=4), bn * bq * per / 128))
    # the W8A8 tensor-core kernel at batch 1 (gate|up's tile) and W4A16 on tensor cores (w4_mma)
    for a_kind, w_kind, label in ((QT.A_INT8, QT.W_INT8, "int8"), (QT.A_FP8, QT.W_FP8, "fp8")):
        ptrs = {"A": "i8" if a_kind == QT.A_INT8 else "fp8e4nv", "B": "i8" if w_kind == QT.W_INT8 else "fp8e4nv",
                "SW": "fp32", "ZW": "fp32", "SA": "fp32", "BIAS": "bf16", "C": "bf16", "OUT": "bf16", "COUNT": "i32"}
        const = dict(A_KIND=a_kind, W_KIND=w_kind, W_SCALE=1, HAS_ZERO=False, SA_ROW=True, HAS_BIAS=False,
                     PARTIAL=False, BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, LAST_SUMS=False)
        out.append((f"wq_mm W8A8 {label} BN128 BK256", QT.wq_mm_kernel, ptrs, const, dict(num_warps=4, num_stages=3),
                    128 * 256 / 128))
        for bn in (64, 128):  # the weight tile as the left operand: a warpgroup MMA on the codes
            out.append((f"wq_mm W8A8 {label} BN{bn} BK256 SWAP", QT.wq_mm_kernel, ptrs,
                        dict(const, BLOCK_N=bn, SWAP=True), dict(num_warps=4, num_stages=3), bn * 256 / 128))
    for bn, bk, one in ((128, 256, False), (64, 128, False), (128, 256, True), (64, 128, True),
                        (256, 128, True)):  # W8A16 on the fp16 tensor cores
        ptrs = {"A": "bf16", "B": "i8", "SW": "fp32", "BIAS": "bf16", "C": "bf16", "OUT": "bf16", "COUNT": "i32"}
        const = dict(W_SCALE=1, HAS_BIAS=False, PARTIAL=False, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, LAST_SUMS=False,
                     ONE_SCALE=one)
        out.append((f"w8_mma W8A16 BN{bn} BK{bk}{' ONE_SCALE' if one else ''}", QT.w8_mma_kernel, ptrs, const,
                    dict(num_warps=4, num_stages=3), bn * bk / 128))
    ptrs = {"A": "bf16", "B": "u8", "SW": "fp32", "ZW": "u8", "BIAS": "bf16", "C": "bf16"}
    const = dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, FP16=False, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1,
                 PREFETCH=False)
    out.append(("w4_mma W4A16 BN64", QT.w4_mma_kernel, ptrs, const, dict(num_warps=4, num_stages=3), 64 * 128 / 128))
    for bn in (64, 128, 256):  # W4A16 on the 16-bit tensor cores, w8_mma's structure (the weight as the right operand)
        ptrs = {"A": "bf16", "B": "u8", "SW": "fp32", "ZW": "u8", "BIAS": "bf16", "C": "bf16", "OUT": "bf16",
                "COUNT": "i32"}
        const = dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, PARTIAL=False, BLOCK_M=16, BLOCK_N=bn,
                     LAST_SUMS=False)
        out.append((f"w4_f16mma W4A16 BN{bn}", QT.w4_f16mma_kernel, ptrs, const, dict(num_warps=4, num_stages=3),
                    bn * 128 / 128))
    for bn in (64, 128, 256):  # W4A16 on the int8 tensor cores (the activation's int8 pieces made by a launch before)
        ptrs = {"P": "i8", "RS": "fp32", "XS": "fp32", "B": "u8", "SW": "fp32", "ZW": "u8", "BIAS": "bf16",
                "C": "fp32", "OUT": "bf16", "COUNT": "i32"}
        const = dict(GROUP=128, GPS=4, HAS_ZERO=False, HAS_BIAS=False, PARTIAL=True, BLOCK_N=bn, LAST_SUMS=True)
        out.append((f"w4_i8mma W4A16 BN{bn} GPS4", QT.w4_i8mma_kernel, ptrs, const, dict(num_warps=4, num_stages=3),
                    bn * 128 * 4 / 128))
    # activation quantization (per element of x): quantize_rows with a static scale, and the persistent
    # Hadamard + quantization kernel of QuaRot's R4 at prefill (14336 = 112 x 128, one row per loop step),
    # each with the exact codes sequence and with FAST_CODES
    import triton.language as tl

    from graphquant.kernels import hadamard_triton as HT

    p = HT.plan(14336, 2)
    d1h = max(p.D1, 16)
    had = dict(BM=p.BM, D1=p.D1, LOG1=d1h.bit_length() - 1, D1H=d1h, D2=p.D2, LOG2=p.D2.bit_length() - 1,
               IN_PARTS=1, MID_PARTS=min(p.mid_parts, 2), MIDDLE=p.middle, OP=tl.bfloat16, STAGES=1)
    for fp8 in (True, False):
        label, qmax, codes = ("fp8", QT.FP8_MAX, "fp8e4nv") if fp8 else ("int8", 127.0, "i8")
        for fast in (False, True):
            tag = f"{label} static{' FAST' if fast else ''}"
            ptrs = {"X": "bf16", "Q": codes, "S": "fp32", "SCALE_IN": "fp32"}
            const = dict(QMAX=qmax, RCP=1 / qmax, FP8=fp8, STATIC=True, BLOCK=4096, FAST=fast)
            out.append((f"quant_rows {tag}", QT.quant_rows_kernel, ptrs, const, dict(num_warps=8), 4096 / 256))
            ptrs = {"x_ptr": "bf16", "a_ptr": "bf16", "y_ptr": codes, "s_ptr": "fp32", "s_in_ptr": "fp32"}
            const = dict(had, QUANT=2 if fp8 else 1, STATIC=True, QMAX=qmax, RCP=1 / qmax, FAST=fast)
            out.append((f"hadamard_quantize 14336 {tag}", HT._persistent_kernel, ptrs, const,
                        dict(num_warps=p.num_warps), 14336 / (32 * p.num_warps)))
            if fast and p.col_split > 1:  # the plan's sliced kernel (per element of its BM x N tile)
                ns = p.D2 // p.col_split
                sliced = dict(BM=p.BM, N=p.D2, CS=p.col_split, LOGS=ns.bit_length() - 1, RH=p.row_split,
                              IN_PARTS=1, MID_PARTS=2, OP=tl.bfloat16, STAGES=p.stages,
                              QUANT=2 if fp8 else 1, STATIC=True, QMAX=qmax, RCP=1 / qmax, FAST=True)
                for mul in (0, 1):  # the static scale's multiplier (hadamard_triton.STATIC_MULTIPLIER)
                    out.append((f"hadamard_quantize 14336 {tag} sliced c{p.col_split}r{p.row_split}"
                                + (" MUL" if mul else ""), HT._persistent_sliced_kernel, dict(ptrs, f_ptr="i32"),
                                dict(sliced, MUL=mul), dict(num_warps=p.num_warps), 14336 / (32 * p.num_warps)))
    # QuaRot's R4 at one row with w4_i8mma's int8 pieces in the epilogue (hadamard_pieces; straight-line code, no
    # main loop: compare the kernel's whole instruction count)
    fp = HT.few_rows_plan(p)
    ptrs = {"x_ptr": "bf16", "a_ptr": "bf16", "y_ptr": "i8", "s_in_ptr": "bf16", "ws_ptr": "fp32", "amax_ptr": "fp32",
            "h_ptr": "bf16"}
    const = dict(BM=16, NT=fp.M0 // 4, BK=fp.BK, NKC=fp.NKC, D1=1, LOG1=0, D2=fp.D2, LOG2=fp.D2.bit_length() - 1,
                 IN_PARTS=1, MID_PARTS=min(fp.mid_parts, 2), MIDDLE=fp.middle, OP=tl.bfloat16, QUANT=3,
                 OUT_DTYPE=tl.bfloat16, ROWS=4)
    for loaded in (False, True):  # stage 2's Sylvester matrix built in registers / read from memory
        out.append((f"hadamard_pieces 14336 one row{' H loaded' if loaded else ''}", HT._factored_kernel, ptrs,
                    dict(const, H_LOADED=loaded), dict(num_warps=fp.num_warps), 1))
    return out


def compile_sm90(kernel, ptrs: dict, const: dict, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    const = {**{n: p.default for n, p in params.items()  # constexpr parameters left at their defaults
                if p.default is not inspect.Parameter.empty and n not in const}, **const}
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
        else:
            sig[n] = "i32"
        if n in _DIVISIBLE and n not in const:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs={k: v for k, v in const.items() if k in names}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def analyse(compiled, per_thread: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    lines = sass.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", l))}
    loop = None  # the longest backward branch: the main loop
    for i, l in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", l)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            if loop is None or i - labels[m.group(1)] > loop[1] - loop[0]:
                loop = (labels[m.group(1)], i)
    ops_all = collections.Counter(m.group(1) for l in lines if (m := _OP.match(l)))
    body = lines[loop[0]:loop[1] + 1] if loop else []
    ops = collections.Counter(m.group(1) for l in body if (m := _OP.match(l)))
    n = sum(ops.values())
    return {"registers": res.get("REG"), "stack_bytes": res.get("STACK"), "local_bytes": res.get("LOCAL"),
            "instructions": sum(ops_all.values()), "loop_instructions": n,
            "weight_elements_per_thread_per_step": per_thread,
            "loop_instructions_per_element": round(n / per_thread, 2) if n else None,
            "loop_mix": dict(ops.most_common(12))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernel_sass.json"))
    ap.add_argument("--only", default="", help="substring of the kernel names to analyse")
    args = ap.parse_args()
    try:
        import triton
    except ImportError:
        raise SystemExit("kernel_sass.py: needs Triton (pip install triton)") from None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generate_gpu import write_json

    rows = []
    print(f"Triton {triton.__version__}, sm_90; loop = the kernel's main loop, per weight (or activation) element of "
          "one thread")
    print(f"{'kernel':44s} {'regs':>4s} {'spill':>5s} {'instr':>5s} {'loop/elem':>9s}  top opcodes in the loop")
    for name, kernel, ptrs, const, options, per_thread in specs():
        if args.only and args.only not in name:
            continue
        r = {"kernel": name, **options, **analyse(compile_sm90(kernel, ptrs, const, options), per_thread)}
        rows.append(r)
        mix = " ".join(f"{k} {v}" for k, v in list(r["loop_mix"].items())[:7])
        print(f"{name:44s} {r['registers']:4d} {r['stack_bytes'] + r['local_bytes']:5d} {r['instructions']:5d} "
              f"{r['loop_instructions_per_element'] or 0:9.2f}  {mix}", flush=True)
    write_json(args.out, {"triton": triton.__version__, "target": "sm_90", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
