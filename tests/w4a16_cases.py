"""Shared by the W4A16 interpreter scripts (``test_w4_f16mma_interpreter.py``, ``test_w4_i8mma_interpreter.py``;
importable there because ``conftest.run_in_triton_interpreter`` puts this folder on ``PYTHONPATH``): one product's
operands with its float64 reference, and the check that ``decode_choice`` / ``decode_mm`` run a kernel the tuned
table names."""
from __future__ import annotations

import torch


def case(M: int, N: int, K: int, group: int, with_bias: bool, with_zero: bool, scale: float):
    """``(x, w, sw, zw, bias, ref)``: bf16 activations spanning five decades (row 1 zeros when ``M > 2``),
    nibble-packed weights with group scales (and zero points), bias, and ``x @ dequant(w).T + bias`` in float64."""
    x = (torch.randn(M, K) * torch.logspace(-3, 2, K)[torch.randperm(K)] * scale).to(torch.bfloat16)
    if M > 2:
        x[1] = 0
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    G = K // group
    sw = torch.rand(N, G) * 0.01 + 1e-3
    zw = torch.randint(0, 16, (N, G), dtype=torch.uint8) if with_zero else None
    bias = torch.randn(N, dtype=torch.bfloat16) if with_bias else None
    u = torch.stack([w & 0xF, w >> 4], dim=-1).reshape(N, K).double()
    z = (zw.double() if with_zero else torch.full((N, G), 8.0, dtype=torch.float64)).repeat_interleave(group, 1)
    deq = (u - z) * sw.double().repeat_interleave(group, 1)
    ref = x.double() @ deq.T + (bias.double() if with_bias else 0.0)
    return x, w, sw, zw, bias, ref


def decode_table_runs(QT, impl: str, rows: int, bucket: int, cfg: dict, x, w, sw, zw, bias, group: int) -> None:
    """With a tuned table naming ``impl`` with ``cfg`` for ``bucket`` rows, ``decode_choice`` picks it and
    ``decode_mm`` on ``rows`` rows of ``x`` gives ``impl``'s result bit for bit."""
    N, K = w.shape[0], 2 * w.shape[1]
    QT._device_name = lambda index: "NVIDIA H200"
    dev = torch.device("cuda", 0)  # only its index is read
    table = {(QT.A_FLOAT, QT.W_INT4, N, K, bucket): dict(impl=impl, **cfg, us=1.0)}
    QT._tuned = lambda name: table
    assert QT.decode_choice(rows, N, K, QT.A_FLOAT, QT.W_INT4, group, dev) == (impl, cfg)
    torch.cuda.current_device = lambda: 0  # CPU tensors: decode_choice asks for the current device's name
    xs = x[:rows].contiguous()
    got = QT.decode_mm(xs, w, sw, w_kind=QT.W_INT4, w_zero=zw, bias=bias, group=group, out_dtype=torch.float32)
    want = getattr(QT, impl)(xs, w, sw, w_zero=zw, bias=bias, group=group, out_dtype=torch.float32, config=cfg)
    assert torch.equal(got, want)
