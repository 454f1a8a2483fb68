"""Issue 12, items 3 and 4: config JSON is type-checked and never imports anything."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from graphquant.config import AlgoConfig, Config, QuaRotConfig, SmoothQuantConfig
from graphquant.errors import ConfigError


@pytest.mark.parametrize("algo,field,bad", [
    ("quarot", "r1", "false"), ("quarot", "r2", "false"), ("quarot", "r3", "false"), ("quarot", "r4", "false"),
    ("quarot", "online_had", 0), ("smoothquant", "fc_fc", "false"), ("smoothquant", "alpha", "0.5"),
    ("smoothquant", "alpha", True), ("gptq", "block_size", 128.0), ("awq", "grid", "20"),
    ("rotation", "seed", "0"), ("autosmoothquant", "alphas", ["0.5"]),
])
def test_algo_config_fields_are_type_checked(algo, field, bad):
    where = "pre_quant_opt_config" if algo in ("quarot", "smoothquant", "rotation") else "algo_config"
    text = json.dumps({"global_quant_config": {}, where: [{"name": algo, field: bad}]})
    with pytest.raises(ConfigError, match=field):
        Config.from_json(text)


def test_string_false_is_not_true():
    """Before: QuaRotConfig(r1="false", ...) was taken as four rotations on."""
    with pytest.raises(ConfigError, match="r1 must be true/false.*without quotes"):
        AlgoConfig.from_dict({"name": "quarot", "r1": "false"})
    assert QuaRotConfig(r1=False).rotations == ("R2", "R3", "R4")
    assert SmoothQuantConfig(alpha=1).alpha == 1  # ints are numbers


def test_layer_type_never_imports(tmp_path, monkeypatch):
    """Before: ``"type": "evilmod.Name"`` imported evilmod, which ran its code."""
    marker = tmp_path / "pwned.txt"
    (tmp_path / "evilmod_gq.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Name: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = Config.from_json(json.dumps({"global_quant_config": {}, "layer_type_quant_config": [
        {"type": "evilmod_gq.Name", "config": {}}, {"type": "this.Thing", "config": {}},
        {"type": "torch.nn.modules.linear.Linear", "config": {}}]}))
    assert not marker.exists() and "evilmod_gq" not in sys.modules
    keys = list(cfg.layer_type_quant_config)
    assert keys[:2] == ["evilmod_gq.Name", "this.Thing"]  # kept as names, matched by class name
    assert keys[2] is torch.nn.Linear  # torch.nn classes come from the fixed table
    assert Config.from_json(cfg.to_json()).layer_type_quant_config.keys() == cfg.layer_type_quant_config.keys()
