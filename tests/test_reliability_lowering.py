"""Issue 12: ``lower=True`` on CPU lowers only what measures faster, never fp8, and says so."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import graphquant as gq
from graphquant.config import preset
from graphquant.lowering.lower import CPU_FP8_REASON
from graphquant.models.tiny import tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantize(scheme, lower):
    cfg = dataclasses.replace(preset(scheme), exclude=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gq.quantize(tiny_model("llama", num_layers=1), cfg, [IDS], progress=False, check=False, lower=lower)


@pytest.mark.parametrize("scheme", ["w_fp8_a_fp8", "w_fp8_a_fp8_per_token"])
def test_fp8_on_cpu_stays_fake_quant_and_never_calls_scaled_mm(scheme, monkeypatch):
    def no_scaled_mm(*a, **k):
        raise AssertionError("torch._scaled_mm called on CPU")

    monkeypatch.setattr(torch, "_scaled_mm", no_scaled_mm)
    qm = _quantize(scheme, True)
    low = qm.lowering
    assert low["policy"] == "auto" and not low["lowered"]
    assert low["fake_quant"] and all(e["reason"] == CPU_FP8_REASON for e in low["fake_quant"])
    qm(input_ids=IDS)
    # even a forced fp8 lowering on CPU multiplies the codes as floats, never through _scaled_mm
    forced = _quantize(scheme, "all")
    assert {e["kernel"] for e in forced.lowering["lowered"]} == {"fp8_linear"}
    assert torch.isfinite(forced(input_ids=IDS).logits).all()


@pytest.mark.parametrize("scheme", ["w_int8_per_channel_a_int8_per_token", "w_int4_per_channel_sym",
                                    "w_int8_per_tensor"])
def test_cpu_lowering_follows_its_own_measurements(scheme):
    qm = _quantize(scheme, True)
    low = qm.lowering
    assert low["cpu_timings"], "every CPU decision is measured"
    by_kernel_shape = {(t["kernel"], tuple(t["shape"])): t for t in low["cpu_timings"]}
    for e in low["lowered"]:
        t = by_kernel_shape[(e["kernel"], tuple(e["shape"]))]
        assert t["kernel_ms"] < t["fake_quant_ms"]
    for e in low["fake_quant"]:
        assert "faster than fake-quant" in e["reason"] and "kept as fake-quant" in e["reason"]
    slow = [t for t in low["cpu_timings"] if not t["lowered"]]
    assert all(t["kernel_ms"] * 1.1 >= t["fake_quant_ms"] for t in slow)
    assert len(low["lowered"]) + len(low["fake_quant"]) == 7 + 1  # 7 Linears in the layer + lm_head
    assert torch.isfinite(qm(input_ids=IDS).logits).all()
