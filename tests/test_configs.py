"""Every YAML preset in configs/ loads and builds what it describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from itera.distill import StudentSpec
from itera.model.config import ModelConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    spec = yaml.safe_load(path.read_text())
    assert isinstance(spec, dict)
    if path.parent.name == "students":
        student = StudentSpec.from_preset(str(path))
        teacher = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=4)
        cfg = student.resolve(None if student.layers else teacher, vocab_size=100)
        assert 0 < cfg.num_parameters() <= max(teacher.num_parameters(), cfg.num_parameters())
        if student.depth or student.width:
            assert cfg.num_parameters() < teacher.num_parameters()
