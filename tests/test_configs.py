"""Every YAML preset in configs/ loads and builds what it describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from itera.model.config import ModelConfig
from itera.train import TrainOptions

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    spec = yaml.safe_load(path.read_text())
    assert isinstance(spec, dict)
    if path.name == "demo.yaml":
        cfg = ModelConfig(vocab_size=spec["tokenizer"]["vocab_size"], **spec["model"])
        assert cfg.num_parameters() > 0
        TrainOptions(**spec["train"]).validate()
