"""`method: prompt_tuning | prefix_tuning | adaption_prompt | bottleneck` through the real training loop.

The loop's loss path, validation, save, reload and base-vs-tuned sampling, on tiny models.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_run_config
from peftkit.config import config_from_dict
from peftkit.artifacts import load_artifact
from peftkit.train import run_training

RUNS = [
    ("prompt_tuning", "llama", {"num_virtual_tokens": 6}),
    ("prompt_tuning", "t5", {"num_virtual_tokens": 6, "init": "random"}),
    ("prefix_tuning", "gpt2", {"num_virtual_tokens": 4}),
    ("adaption_prompt", "llama", {"adapter_len": 4, "adapter_layers": 2}),
    ("bottleneck", "llama", {"placement": "pfeiffer", "reduction_factor": 8}),
    ("bottleneck", "t5", {"placement": "houlsby"}),
]


@pytest.mark.parametrize(("method", "kind", "section"), RUNS, ids=[f"{m}-{k}" for m, k, _ in RUNS])
def test_train_save_reload(method, kind, section, model_dirs, data_file, rows, tmp_path):
    raw = tiny_run_config(model_dirs[kind], data_file, tmp_path / "run", max_steps=2)
    raw.update(method=method, **{method: section})
    raw["generate"]["num_samples"] = 1
    result = run_training(config_from_dict(raw))
    assert math.isfinite(result.val_loss) and math.isfinite(result.last_loss)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING",
                                   "adaption_prompt": "ADAPTION_PROMPT", "bottleneck": "PEFTKIT_BOTTLENECK"}[method]
    (sample,) = result.samples
    row = next(r for r in rows if r["summary"] == sample["reference"])
    loaded = load_artifact(result.adapter_dir, device="cpu")
    # the reloaded adapter answers as the trained one did, and disabling it gives the base's answer
    assert loaded.generate([row], max_new_tokens=8) == [sample["tuned"]]
    assert loaded.generate([row], max_new_tokens=8, base=True) == [sample["base"]]
