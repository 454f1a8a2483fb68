"""Capture a model with non-strict ``torch.export`` into a :class:`CapturedGraph`.

The captured graph is the *unlifted* module of the exported program (``ExportedProgram.module()``):
parameters are ``get_attr`` nodes whose targets are the model's state-dict names, and every
``call_function`` node carries ``nn_module_stack``, from which we read the module FQN.

Batch and sequence dimensions of every tensor input are dynamic, so the captured module runs on
any batch size and length. Non-tensor inputs (e.g. ``use_cache=False``) are baked in as constants
and filled in automatically by :meth:`CapturedGraph.__call__`.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import CaptureError, UnsupportedModelError

DEFAULT_BATCH, DEFAULT_SEQ = 2, 16


@dataclass
class CapturedGraph:
    """A model captured as an ATen graph plus the name mappings the passes need.

    Attributes:
        gm: the unlifted ``GraphModule``; its parameters are the model's (shared, not copied).
        model_class: class name of the captured model.
        example_args / example_kwargs: the inputs used for export.
        constant_kwargs: non-tensor keyword inputs baked into the graph (filled in on call).
        param_aliases: graph parameter target -> every state-dict name of that tensor
            (tied weights have several).
    """

    gm: fx.GraphModule
    model_class: str
    example_args: tuple
    example_kwargs: dict
    constant_kwargs: dict = field(default_factory=dict)
    param_aliases: dict[str, list[str]] = field(default_factory=dict)
    config: Any = None  # the HF config when the model has one

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def __call__(self, *args, **kwargs):
        kwargs = self._check_kwargs(kwargs)
        return self.gm(*args, **{**self.constant_kwargs, **kwargs})

    def _check_kwargs(self, kwargs: dict) -> dict:
        """Inputs the graph was not captured with: an all-ones ``attention_mask`` is dropped (it changes
        nothing); anything else is a one-line error that says how to capture with it."""
        unknown = [k for k in kwargs if k not in self.example_kwargs and k not in self.constant_kwargs]
        if not unknown:
            return kwargs
        mask = kwargs.get("attention_mask")
        if unknown == ["attention_mask"] and isinstance(mask, torch.Tensor) and bool((mask != 0).all()):
            return {k: v for k, v in kwargs.items() if k != "attention_mask"}
        raise CaptureError(
            f"this graph was captured with inputs {list(self.example_kwargs) or 'positional'} and cannot take "
            f"{unknown}; capture with them: pass calibration batches that carry them (dicts such as "
            "{'input_ids': ..., 'attention_mask': ...}) or example_inputs={'input_ids': ids, "
            "'attention_mask': mask}")

    # --- name mappings -------------------------------------------------------------------
    def param(self, target: str) -> torch.Tensor:
        """The tensor behind a ``get_attr`` target (parameter or buffer)."""
        return _get_attr(self.gm, target)

    def node_module(self, node: fx.Node) -> str:
        """FQN of the innermost module that produced ``node`` ('' for the top level)."""
        return node_module_fqn(node)

    def param_target(self, node: fx.Node) -> str | None:
        """If ``node`` reads a parameter (through bookkeeping ops), its ``get_attr`` target."""
        from .patterns.matcher import skip_transparent_back

        node = skip_transparent_back(node)
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return str(node.target)
        return None

    def state_dict_names(self, target: str) -> list[str]:
        return self.param_aliases.get(target, [target])

    def linear_fqn(self, node: fx.Node) -> str:
        """Module FQN of an ``aten.linear`` node: from its module stack, else from its weight name."""
        fqn = node_module_fqn(node)
        if fqn:
            return fqn
        target = self.param_target(node.args[1])
        return target.rsplit(".", 1)[0] if target else node.name


def _get_attr(gm: nn.Module, target: str) -> torch.Tensor:
    mod = gm
    *path, leaf = target.split(".")
    for p in path:
        mod = getattr(mod, p)
    return getattr(mod, leaf)


def set_attr(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the parameter/buffer at ``target`` (creating intermediate containers as needed)."""
    mod = gm
    *path, leaf = target.split(".")
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Parameter) or (leaf in mod._parameters):
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        mod._parameters[leaf] = value
    else:
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        mod.register_buffer(leaf, value)


def _normalize_fqn(path: str) -> str:
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def node_module_fqn(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _type = list(stack.values())[-1]
    if path.startswith("_empty_nn_module_stack"):
        return ""
    return _normalize_fqn(path)


# --- example inputs ----------------------------------------------------------------------
def default_example_inputs(model: nn.Module, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ) -> tuple[tuple, dict]:
    """Example inputs for Hugging Face models: ``input_ids`` of shape (batch, seq), no KV cache."""
    sig = _forward_signature(model)
    if "input_ids" not in sig:
        raise CaptureError(
            f"cannot build example inputs for {type(model).__name__}: its forward() has no 'input_ids' "
            f"argument (it takes {list(sig)[:6]}). Pass example_inputs=(args,) or ({{'name': tensor}}) explicitly."
        )
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or 100
    device = _model_device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 32000), (batch, seq), generator=gen).to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "use_cache" in sig:
        kwargs["use_cache"] = False
    return (), kwargs


def example_inputs_for(model: nn.Module, calib) -> dict | None:
    """Example inputs that match the calibration batches: the default ``input_ids`` plus the other
    tensor inputs the batches carry (an all-ones ``attention_mask``, zero ``token_type_ids``), so a
    padded ``{"input_ids", "attention_mask"}`` calibration set is captured with its mask. ``None``
    (the default example inputs) when the batches are plain tensors."""
    first = calib[0] if isinstance(calib, (list, tuple)) and calib else None
    if first is None or not hasattr(first, "keys"):
        return None
    sig = _forward_signature(model)
    extra = [k for k in first.keys() if k != "input_ids" and isinstance(first[k], torch.Tensor) and k in sig]
    if "input_ids" not in first.keys() or not extra or "input_ids" not in sig:
        return None
    _, kwargs = default_example_inputs(model)
    ids = kwargs["input_ids"]
    for k in extra:
        if k == "attention_mask":
            kwargs[k] = torch.ones_like(ids, dtype=first[k].dtype)
        elif k == "token_type_ids":
            kwargs[k] = torch.zeros_like(ids, dtype=first[k].dtype)
    return kwargs


def _forward_signature(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def normalize_example_inputs(example_inputs) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of args, a dict of kwargs, or an ``(args, kwargs)`` pair."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs of type {type(example_inputs).__name__} not understood; pass a tensor, a tuple of "
        "tensors, a dict of keyword tensors, or an (args, kwargs) pair"
    )


def _dynamic_shapes(args: tuple, kwargs: dict):
    from torch.export import Dim

    def spec(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return {i: Dim.AUTO for i in range(min(v.dim(), 2))}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def _param_aliases(model: nn.Module) -> dict[int, list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    return by_id


def capture(model: nn.Module, example_inputs=None) -> CapturedGraph:
    """Export ``model`` (non-strict) with dynamic batch/sequence dims and return the captured graph.

    The graph shares the model's parameters: passes that rewrite weights in the graph rewrite the
    model too; callers that must keep the model intact copy it first (``quantize`` does).
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"graphquant works on torch.nn.Module objects, got {type(model).__name__}. "
            "Load the model first, e.g. transformers.AutoModelForCausalLM.from_pretrained(path)."
        )
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no torch.nn.Linear layer: there is nothing to quantize, smooth or rotate."
        )
    if example_inputs is None:
        args, kwargs = default_example_inputs(model)
    else:
        args, kwargs = normalize_example_inputs(example_inputs)
        if kwargs and "use_cache" in _forward_signature(model) and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a KV cache object cannot be a graph output; the graph needs none
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constant_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    was_training = model.training
    model.eval()
    # torch.export prints the partial FX graph to stderr when it fails: buffer stderr, replay it on
    # success and drop it on failure (the original exception, chained below, keeps .partial_fx_graph)
    err = io.StringIO()
    try:
        ds_args, ds_kwargs = _dynamic_shapes(args, kwargs)
        with torch.no_grad(), contextlib.redirect_stderr(err):
            dynamic_shapes = (*ds_args, *ds_kwargs.values()) if args else ds_kwargs
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - we re-raise with a clear message
        raise CaptureError(_explain_export_failure(model, e)) from e
    else:
        if err.getvalue():
            sys.stderr.write(err.getvalue())
    finally:
        model.train(was_training)
    gm = ep.module()
    # drop torch.export's input-constraint pre-hook: it rejects batch size 1 although the graph
    # was traced size-obliviously and runs on it (checked by tests)
    for k, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[k]
    drop_metadata_asserts(gm)
    if _all_float64(model):
        promote_downcasts(gm)
    by_id = _param_aliases(model)
    aliases: dict[str, list[str]] = {}
    for target, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        names = by_id.get(id(tensor))
        if names is None:  # unlift may wrap tensors; match by storage
            names = [n for n, p in model.state_dict(keep_vars=True).items()
                     if isinstance(p, torch.Tensor) and p.data_ptr() == tensor.data_ptr() and p.shape == tensor.shape]
        aliases[target] = sorted(set(names or [target]))
    return CapturedGraph(gm=gm, model_class=type(model).__name__, example_args=args, example_kwargs=tensor_kwargs,
                         constant_kwargs=constant_kwargs, param_aliases=aliases, config=getattr(model, "config", None))


def drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """Remove ``_assert_tensor_metadata`` nodes: export's dtype/device asserts, which rewrites
    that change dtypes (float64 promotion, quantization) would trip."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)
    gm.recompile()


def _all_float64(model: nn.Module) -> bool:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return bool(floats) and all(d == torch.float64 for d in floats)


_DOWNCAST_OPS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout}


def promote_downcasts(gm: fx.GraphModule) -> int:
    """In a float64 model, make casts of float64 values to a narrower float type no-ops.

    Hugging Face norms "upcast" to float32 for precision, which in a float64 model is a downcast
    that limits the whole model to float32 accuracy. Capture removes those, so a float64 model
    really computes in float64 (rewrites can then be checked to 1e-9). Returns the count removed.
    """
    removed = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _DOWNCAST_OPS:
            continue
        src = n.args[0]
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        dtype = n.args[1] if n.target == torch.ops.aten.to.dtype and len(n.args) > 1 else n.kwargs.get("dtype")
        if isinstance(val, torch.Tensor) and val.dtype == torch.float64 and dtype in (torch.float32, torch.float16,
                                                                                       torch.bfloat16):
            n.replace_all_uses_with(src)
            gm.graph.erase_node(n)
            removed += 1
    if removed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return removed


_HINTS = [
    (r"DynamicCache|Cache\b", "the model returns a KV cache object; pass use_cache=False among example_inputs"),
    (r"data-dependent|GuardOnDataDependentSymNode|Could not guard on data-dependent",
     "the model branches on tensor values; make the branch static or pass example_inputs that avoid it"),
    (r"Constraints violated|specialized|must be specialized",
     "a dynamic dimension got specialized; the model may require a fixed batch/sequence length"),
    (r"unsupported|not supported|NotImplementedError",
     "an operation is not exportable; check the model runs under torch.export(strict=False)"),
]


def _explain_export_failure(model: nn.Module, e: Exception) -> str:
    msg = str(e).strip().splitlines()
    first = next((line for line in msg if line.strip()), type(e).__name__)
    hint = next((h for pat, h in _HINTS if re.search(pat, str(e))), "check that model(**example_inputs) runs eagerly "
                "and that example_inputs match its forward() signature")
    return (f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first[:300]}\n"
            f"hint: {hint}")
