"""The equivalence guard: offline rewrites must keep the float model's function.

Before the passes run, the guard records the captured graph's output on a probe batch; after each
function-preserving pass it compares again and raises ``EquivalenceError`` naming the pass.
"""
from __future__ import annotations

import torch

from .errors import EquivalenceError

# tolerance on the relative (Frobenius) output error, by parameter dtype: exact rewrites only
# add rounding, which in bf16 accumulates over depth (a 32-layer random-init bf16 Llama drifts by a
# few percent), while a wrong rewrite gives errors of order 1
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 0.15, torch.float16: 0.05}


def model_output(out) -> torch.Tensor:
    """The main output tensor of a model call: logits, last_hidden_state, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, dict):
        for name in ("logits", "last_hidden_state"):
            if isinstance(out.get(name), torch.Tensor):
                return out[name]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: the worst element, relative to the output's scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))


def relative_norm_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖a‖ (Frobenius): robust to single-element rounding outliers."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / a.norm().clamp(min=1e-30))


class EquivalenceGuard:
    def __init__(self, captured, tolerance: float | None = None):
        self.captured = captured
        self.args, self.kwargs = captured.example_args, captured.example_kwargs
        dtype = next((p.dtype for p in captured.gm.parameters() if p.is_floating_point()), torch.float32)
        self.tolerance = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-3)
        self.reference = self._run()
        self.errors: dict[str, float] = {}

    def _run(self) -> torch.Tensor:
        with torch.no_grad():
            return model_output(self.captured(*self.args, **self.kwargs)).clone()

    def rebase(self) -> None:
        """Take the current output as the reference (after a pass that changes the function on purpose)."""
        self.reference = self._run()

    def check(self, pass_name: str) -> float:
        err = relative_norm_error(self.reference, self._run())
        self.errors[pass_name] = err
        if not err <= self.tolerance:  # also catches NaN
            raise EquivalenceError(
                f"pass {pass_name!r} changed the float model's output: relative error {err:.3g} > tolerance "
                f"{self.tolerance:g} on the probe batch. This is a bug in the pass or an unsupported model "
                "construct; disable the pass or report the model")
        return err
