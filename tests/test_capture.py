"""Capture: the exported graph keeps the model's function on new shapes, names map back to the
model, and bad input gives a short graphquant error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.models.tiny import ARCHITECTURES


def _output_tensor(out):
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
        if isinstance(out, dict) and key in out:
            return out[key]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# --- the captured graph computes the model's function ------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch,seq", [(3, 11), (1, 5)])
def test_captured_graph_matches_eager_on_new_shapes(tiny_analysis, arch, batch, seq):
    a = tiny_analysis(arch)
    captured = a.captured
    assert tuple(captured.example_kwargs["input_ids"].shape) == (2, 16)
    ids = torch.randint(0, a.model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
    kwargs = {"use_cache": False} if arch != "bert" else {}
    with torch.no_grad():
        eager = _output_tensor(a.model(input_ids=ids, **kwargs))
        graph = _output_tensor(captured(input_ids=ids))
    assert graph.shape == eager.shape
    assert eager.shape[:2] == (batch, seq)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_linear_node_maps_to_a_real_linear(tiny_analysis, arch):
    a = tiny_analysis(arch)
    modules = dict(a.model.named_modules())
    linear_nodes = [n for n in a.captured.graph.nodes
                    if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
    n_linear_modules = sum(isinstance(m, nn.Linear) for m in a.model.modules())
    assert len(linear_nodes) == n_linear_modules
    fqns = [a.captured.linear_fqn(n) for n in linear_nodes]
    assert len(set(fqns)) == len(fqns)
    for n, fqn in zip(linear_nodes, fqns):
        assert isinstance(modules.get(fqn), nn.Linear), f"{n.name} -> {fqn!r} is not an nn.Linear"
        assert a.captured.node_module(n) == fqn
        # the weight read by the node is that module's weight, by name and by storage
        target = a.captured.param_target(n.args[1])
        assert f"{fqn}.weight" in a.captured.state_dict_names(target)
        assert a.captured.param(target).data_ptr() == modules[fqn].weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_every_parameter_maps_to_state_dict_names(tiny_analysis, arch):
    a = tiny_analysis(arch)
    state = a.model.state_dict(keep_vars=True)
    for target, names in a.captured.param_aliases.items():
        assert names, target
        for name in names:
            if name in state:
                assert state[name].data_ptr() == a.captured.param(target).data_ptr()


def test_tied_weights_have_both_names(tiny_analysis):
    a = tiny_analysis("gemma")
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight
    tied = {"lm_head.weight", "model.embed_tokens.weight"}
    holders = [t for t, names in a.captured.param_aliases.items() if tied <= set(names)]
    assert holders, a.captured.param_aliases
    for t in holders:
        assert a.captured.param(t).data_ptr() == a.model.lm_head.weight.data_ptr()
    # untied models keep one name per tensor
    llama = tiny_analysis("llama").captured.param_aliases
    assert all(len(names) == 1 for names in llama.values())


def test_capture_restores_training_mode():
    from graphquant.models.tiny import tiny_model

    model = tiny_model("opt", num_layers=1).train()
    gq.capture(model)
    assert model.training


def test_explicit_example_inputs_forms():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    m = Mlp().eval()
    x = torch.randn(2, 4, 8)
    for inputs in (x, (x,), {"x": x}, ((x,), {})):
        cg = gq.capture(m, inputs)
        y = torch.randn(5, 3, 8)
        call = cg(**{"x": y}) if isinstance(inputs, dict) else cg(y)
        torch.testing.assert_close(call, m(y))
    with pytest.raises(gq.CaptureError):
        gq.capture(m, 3.0)


# --- bad input ------------------------------------------------------------------------------------
def test_non_module_is_rejected():
    with pytest.raises(gq.UnsupportedModelError, match="nn.Module"):
        gq.analyze("meta-llama/Llama-2-7b-hf")
    with pytest.raises(gq.UnsupportedModelError, match="nn.Module"):
        gq.analyze({"model.weight": torch.zeros(2, 2)})


def test_module_without_linear_is_rejected():
    class NoLinear(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    with pytest.raises(gq.UnsupportedModelError, match="Linear") as info:
        gq.analyze(NoLinear(), torch.randn(2, 3))
    assert "NoLinear" in str(info.value)
    assert isinstance(info.value, gq.GraphQuantError)


class BranchesOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace this
            return self.proj(x)
        return -self.proj(x)


class ItemShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        n = int((x > 0).sum().item())  # a tensor value used as a shape
        return self.proj(x).sum() + torch.zeros(n)


@pytest.mark.parametrize("cls", [BranchesOnData, ItemShape])
def test_export_failure_is_a_short_capture_error(cls, capfd):
    with pytest.raises(gq.CaptureError) as info:
        gq.analyze(cls(), torch.randn(2, 4, 8))
    msg = str(info.value)
    assert cls.__name__ in msg
    assert "\nhint: " in msg
    assert len(msg) < 800
    assert "Traceback" not in msg and "File \"" not in msg
    assert isinstance(info.value.__cause__, Exception)  # the original error stays reachable
    # torch.export's partial-graph dump is not sprayed onto the terminal
    _out, err = capfd.readouterr()
    assert "def forward" not in err


def test_missing_input_ids_without_example_inputs():
    with pytest.raises(gq.CaptureError, match="example_inputs") as info:
        gq.analyze(BranchesOnData())
    assert "BranchesOnData" in str(info.value) and len(str(info.value)) < 800
