"""``GraphModel``: a captured (and rewritten) graph as an ``nn.Module`` with the model's call signature."""
from __future__ import annotations

from torch import nn


class GraphModel(nn.Module):
    """Calls the rewritten graph like the original model (same inputs, same output structure).

    Attributes: ``report`` (the pattern report), ``plan``, ``log`` (what every pass changed),
    ``equivalence`` (pass -> relative output error measured by the guard).
    """

    def __init__(self, captured, report=None, plan=None, log=None, equivalence=None):
        super().__init__()
        self.gm = captured.gm
        self.captured = captured
        self.report = report
        self.plan = plan
        self.log = list(log or [])
        self.equivalence = dict(equivalence or {})
        self.config = getattr(captured, "config", None)

    def forward(self, *args, **kwargs):
        return self.captured(*args, **kwargs)

    def to_hf(self, kernels: str = "never", device=None):
        """The user's Hugging Face model class with this graph's weights, quantized Linears
        (``graphquant.export.qlinear.QuantLinear``) and online R3/R4 / KV-cache quantizers at the
        sites the graph found: ``generate`` (KV cache, ``attention_mask``), ``save_pretrained`` and
        ``.to(device)`` work. Logits equal this model's (bit-identical with ``kernels="never"``;
        ``"auto"`` runs the low-precision kernels where they are faster on ``device``, ``"always"``
        wherever one exists)."""
        from .export import to_hf

        return to_hf(self, kernels=kernels, device=device)

    def save_pretrained(self, path, format: str = "compressed-tensors", max_shard_size="5GB",
                        overwrite: bool = False, tokenizer=None, source=None) -> dict:
        """Write a checkpoint that other tools load: ``format`` "compressed-tensors" (llm-compressor,
        vLLM, transformers) or "quark" (AMD Quark's HF format; "hf_format" is an alias). Sharded
        safetensors, ``config.json`` with ``quantization_config``, the tokenizer / generation config
        of ``source`` (the input model folder) when given, and ``graphquant_export.json`` saying
        which consumer ignores what. Written atomically; a non-empty folder graphquant did not
        write is refused unless ``overwrite``. Returns the export summary."""
        from .export import save_pretrained

        return save_pretrained(self, path, format=format, max_shard_size=max_shard_size, overwrite=overwrite,
                               tokenizer=tokenizer, source=source, inputs=(source,) if source else ())

    def log_summary(self) -> str:
        lines = []
        for e in self.log:
            rest = {k: v for k, v in e.items() if k != "pass"}
            lines.append(f"[{e.get('pass')}] " + ", ".join(f"{k}={v}" for k, v in rest.items()))
        return "\n".join(lines)


class QuantizedModel(GraphModel):
    """A quantized model: call it like the original. Carries ``report``, ``plan``, ``log``,
    ``config`` (the graphquant ``Config``) and ``lowering`` (what runs on real kernels)."""

    def __init__(self, captured, report=None, plan=None, log=None, equivalence=None, quant_config=None):
        super().__init__(captured, report, plan, log, equivalence)
        self.quant_config = quant_config
        self.lowering: dict = {}
        self._bypassed: list = []

    def quantizer_nodes(self):
        from .passes.quantize import QDQ_TAG

        return [n for n in self.gm.graph.nodes if QDQ_TAG in n.meta]

    def disable_quantizers(self) -> None:
        """Bypass every quantizer: activations pass through, weights are read in float. Needs the
        float weights (``quantize(..., keep_float_weights=True)``)."""
        from .passes.quantize import QDQ_TAG

        if self._bypassed:
            return
        g = self.gm.graph
        for n in self.quantizer_nodes():
            info = n.meta[QDQ_TAG]
            if info["role"] == "weight":
                target = info["float_weight"]
                try:
                    self.captured.param(target)
                except AttributeError:
                    raise RuntimeError("the float weights were not kept; quantize with keep_float_weights=True to "
                                       "compare with quantizers disabled") from None
                with g.inserting_before(n):
                    src = g.get_attr(target)
            else:
                src = n.args[0]
            users = list(n.users)
            for u in users:
                u.replace_input_with(n, src)
            self._bypassed.append((n, src, users))
        self.gm.recompile()

    def enable_quantizers(self) -> None:
        g = self.gm.graph
        for n, src, users in self._bypassed:
            for u in users:
                u.replace_input_with(src, n)
            if src.op == "get_attr" and not src.users:
                g.erase_node(src)
        self._bypassed = []
        self.gm.recompile()

    def parameter_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.gm.parameters()) + list(self.gm.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total
