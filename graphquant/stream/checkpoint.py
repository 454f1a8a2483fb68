"""A Hugging Face checkpoint folder read without loading it: the model's structure on the meta device,
and its weights one tensor at a time from the safetensors shards (``safe_open``)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError

INDEX = "model.safetensors.index.json"


class CheckpointWeights:
    """The tensors of a safetensors checkpoint folder (one file or shards with an index), read lazily.

    ``load(name)`` reads one tensor from its shard (memory-mapped by safetensors, copied out), so
    only what is asked for becomes resident."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.folder} has no model.safetensors or {INDEX}: streamed quantization reads "
                                  "safetensors checkpoints; re-save the model with save_pretrained(safe_serialization"
                                  "=True) or use graphquant.quantize() on a loaded model")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            self.file_of = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            self.file_of = dict(weight_map)

    def _open(self, fname: str):
        from safetensors import safe_open

        if fname not in self._handles:
            path = self.folder / fname
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in {INDEX} but missing; the checkpoint is incomplete")
            self._handles[fname] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[fname]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def load(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """The tensor ``name`` in ``dtype`` on ``device``."""
        if name not in self.file_of:
            raise CheckpointError(f"{name} is not in the checkpoint {self.folder}")
        t = self._open(self.file_of[name]).get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def close(self) -> None:
        self._handles.clear()


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside the block is moved to the meta device as it is created (one
    tensor at a time); buffers stay real. What accelerate's ``init_empty_weights(include_buffers=False)``
    does, without needing accelerate."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_model(path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The model of the checkpoint folder ``path`` with every parameter on the meta device (no
    weights read, a few MB of memory): for ``graphquant.analyze`` and the streamed pipeline.
    Buffers computed from the config (RoPE frequencies) are real. Returns the model in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json; pass a Hugging Face model folder (written by save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(f"transformers cannot read the config of {p}: {e}") from e
    with parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def retarget_devices(gm, device) -> int:
    """Make the device constants a meta capture baked into the graph (``arange(..., device="meta")``,
    ``to(device="meta")``: RoPE positions, masks) name ``device``. Returns the number of nodes changed."""
    device = torch.device(device)
    meta = torch.device("meta")

    def sub(v):
        if isinstance(v, torch.device) and v == meta:
            return device
        if isinstance(v, (list, tuple)):
            return type(v)(sub(x) for x in v)
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    changed = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        args, kwargs = sub(n.args), sub(n.kwargs)
        if args != n.args or kwargs != n.kwargs:
            n.args, n.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    return changed
