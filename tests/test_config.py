"""Config loading: defaults, overrides, every error at once, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.config import RunConfig, config_from_dict, field_docs, load_config
from peftkit.data.datasets import load_task
from peftkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_documented_contract():
    cfg = load_config(None)
    assert (cfg.model, cfg.method, cfg.data.dataset) == ("smollm2-135m", "lora", "aclsum/outcome")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.epochs, cfg.train.batch_size) == (16, 32.0, 2, 8)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["train.epochs=1", "lora.target_modules=[q_proj, k_proj]", "train.lr=1e-3", "data.dataset=aclsum/challenge"])
    assert cfg.train.epochs == 1 and cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.train.lr == 1e-3
    assert cfg.data.dataset == "aclsum/challenge"


def test_every_error_is_reported_at_once_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"modle": "x", "train": {"epocs": 1, "batch_size": "eight"}, "method": "lorra"})
    text = str(info.value)
    assert "4 problem(s)" in text
    assert "did you mean 'model'" in text and "did you mean 'epochs'" in text and "did you mean 'lora'" in text
    assert "train.batch_size: expected a whole number" in text


@pytest.mark.parametrize(
    "override, message",
    [("lora.r=0", "lora.r: must be at least 1"), ("lora.alpha=-1", "lora.alpha: must be positive"),
     ("train.batch_size=0", "train.batch_size"), ("lora.dropout=1.5", "lora.dropout"), ("train.lr=true", "train.lr: expected a number")],
)
def test_impossible_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntrain: {epochs: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:.*line \d+"):
        load_config(bad)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_every_field_is_documented():
    from peftkit import config as c

    for cls in (c.DataConfig, c.LoraConfig, c.TrainConfig, c.GenerateConfig, c.EmbeddingConfig, c.ClassificationConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_shipped_configs_exist():
    assert SHIPPED, "no shipped configs found under configs/"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads_and_dry_runs(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    if cfg.task != "generation":  # embedding / classification rows, and the model a built-in can resolve
        from peftkit.models import resolve_model_path
        from peftkit.tasks.data import load_encoder_data

        assert load_encoder_data(cfg).train and Path(resolve_model_path(cfg.model)).is_dir()
        return
    if cfg.objective != "sft":  # preference pairs (docs/preference.md)
        from peftkit.data.preference import load_pairs

        pairs = load_pairs(cfg.data, cfg.preference, cfg.train.seed)
        assert pairs.train and pairs.format.templates
        return
    task = load_task(cfg.data, cfg.train.seed)  # the data it names exists and has the needed columns
    assert task.train and task.format.templates
