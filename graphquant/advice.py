"""Warnings about config combinations that measured worse on a real pretrained LLM (issue 11).

``config_advice(config)`` returns one-line notes; the CLI prints them before quantizing. Every note is
backed by a measurement in ``benchmarks/results/accuracy_smollm2_gpu1.json`` (SmolLM2-135M, WikiText-2,
256 windows, H200):

- a rotation (R1) with fp8 or with round-to-nearest int4 weights: SmolLM2's attention-sink token has a
  huge normalized residual in a few channels that the RMSNorm gain damps. R1 folds the gain into the
  weights and spreads the token over every channel, so the token's value vector (what most heads read)
  collects the quantization error of whole weight rows (``benchmarks/rotation_sink_error.py``:
  layers.20 v_proj sink-token error W4 0.48 -> 1.90, fp8 0.03 -> 0.34). fp8 none +3.1% vs QuaRot +5.9%;
  W4A8 RTN none +115% vs QuaRot +489%; with GPTQ the rotation helps (GPTQ +74%, QuaRot + GPTQ +31%).
- static per-tensor activations without ``SinkTokenConfig``: the first token's massive activations
  (3065 vs 14 at layers.11 down_proj) set the scale; QuaRot +15.4%, QuaRot + sink token +2.8%.
"""
from __future__ import annotations

__all__ = ["config_advice"]


def _names(items) -> set[str]:
    items = items or []
    items = items if isinstance(items, (list, tuple)) else [items]
    return {type(a).__name__ for a in items}


def _has_r1(config) -> bool:
    for a in config.pre_quant_opt_config or []:
        name = type(a).__name__
        if name == "RotationConfig" or (name == "QuaRotConfig" and getattr(a, "r1", False)):
            return True
    return False


def config_advice(config) -> list[str]:
    """One-line notes for ``config`` (a ``graphquant.config.Config``); empty when nothing applies."""
    from .config import Dtype, QSchemeType

    g = config.global_quant_config
    w, a = g.weight, g.input_tensors
    algos = _names(config.algo_config)
    notes = []
    if _has_r1(config):
        fp8 = any(s is not None and s.dtype in (Dtype.fp8_e4m3, Dtype.fp8_e5m2) for s in (w, a))
        int4_rtn = (w is not None and w.dtype in (Dtype.int4, Dtype.uint4, Dtype.int2)
                    and not ({"GPTQConfig", "AWQConfig"} & algos))
        if fp8:
            notes.append("rotation with fp8: on models with attention-sink massive activations a rotation can be "
                         "worse than none (SmolLM2-135M: fp8 none +3.1%, QuaRot +5.9%); compare both on your model")
        if int4_rtn:
            notes.append("rotation with round-to-nearest int4 weights: can be much worse than none on models with "
                         "attention sinks (SmolLM2-135M W4A8: none +115%, QuaRot +489%); add --quant_algo gptq "
                         "(QuaRot + GPTQ +31%)")
    static_tensor = (a is not None and not a.is_dynamic and a.qscheme == QSchemeType.per_tensor)
    if static_tensor and "SinkTokenConfig" not in algos:
        notes.append("static per-tensor activations: the first token's massive activations set the scales; "
                     "add --sink_tokens 1 (SinkTokenConfig; SmolLM2-135M W8A8 + QuaRot: +15.4% -> +2.8%)")
    return notes
