"""Every YAML preset in itera/configs/ loads and builds what it describes."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from itera.model.config import ModelConfig
from itera.student import StudentSpec


def _yaml_files(node, prefix=""):
    """Every YAML file in the installed itera.configs package data, as (relative name, resource)."""
    for child in node.iterdir():
        if child.is_dir() and child.name != "__pycache__":
            yield from _yaml_files(child, prefix + child.name + "/")
        elif child.name.endswith(".yaml"):
            yield prefix + child.name, child


CONFIGS = sorted(_yaml_files(resources.files("itera.configs")), key=lambda x: x[0])


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("name,path", CONFIGS, ids=[n for n, _ in CONFIGS])
def test_config_loads(name, path):
    spec = yaml.safe_load(path.read_text())
    assert isinstance(spec, dict)
    if name.startswith("students/"):
        student = StudentSpec.from_preset(str(path))
        teacher = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=4)
        cfg = student.resolve(None if student.layers else teacher, vocab_size=100)
        explicit = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                    "kv_heads": "num_key_value_heads", "ffn": "intermediate_size"}
        for key, attr in explicit.items():  # what the preset spells out is what the student gets
            if spec.get(key) is not None:
                assert getattr(cfg, attr) == spec[key], (key, getattr(cfg, attr))
        if student.depth:
            assert cfg.num_hidden_layers == round(teacher.num_hidden_layers * student.depth)
        if student.depth or student.width:
            assert cfg.num_parameters() < teacher.num_parameters()
