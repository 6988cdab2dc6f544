"""Property-based fuzzing of the two loaders users feed by hand: whatever comes in, the answer is a
valid result or the loader's own user error (ConfigError / DataError), never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.config import RunConfig, config_from_dict, load_config
from peftkit.data.sources import check_columns, read_rows
from peftkit.errors import ConfigError, DataError

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Real keys (so trees reach the nested sections and their range checks) and strangers.
SECTIONS = ["model", "method", "data", "lora", "quant", "selective", "prompt_tuning", "train", "generate", "output_dir"]
FIELDS = ["r", "alpha", "dropout", "target_modules", "epochs", "batch_size", "lr", "seed", "max_steps", "train", "dataset",
          "max_length", "val_ratio", "test_ratio", "mixture", "weight", "columns", "packing", "temperature", "top_p",
          "bits", "layers", "components", "schedule", "precision", "init", "num_virtual_tokens"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["lora", "qlora", "full", "cosine", "nf4", "all-linear", "aclsum/outcome", "1e-3"]),
)
keys = st.one_of(st.sampled_from(SECTIONS + FIELDS), st.text(max_size=8), st.integers(-3, 3))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
                     max_leaves=25)
configs = st.dictionaries(st.sampled_from(SECTIONS) | keys, trees, max_size=6)


def config_or_error(load) -> RunConfig | None:
    try:
        cfg = load()
    except ConfigError as exc:
        assert str(exc), "a ConfigError must say what is wrong"
        return None
    assert isinstance(cfg, RunConfig)
    return cfg


@FUZZ
@given(raw=configs)
def test_config_trees_give_a_config_or_a_config_error(raw):
    config_or_error(lambda: config_from_dict(raw))


@FUZZ
@given(text=st.one_of(st.text(max_size=200), configs.map(lambda t: yaml.safe_dump(t, allow_unicode=True))),
       overrides=st.lists(st.one_of(
           st.text(max_size=30),
           st.tuples(st.sampled_from([f"{s}.{f}" for s in SECTIONS for f in FIELDS[:12]] + SECTIONS), st.text(max_size=15))
           .map("=".join),
       ), max_size=4))
def test_yaml_text_and_overrides_give_a_config_or_a_config_error(text, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cfg.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        config_or_error(lambda: load_config(path, overrides))


rows = st.lists(st.dictionaries(st.sampled_from(["abstract", "summary", "text", "messages", "x"]) | st.text(max_size=5),
                                trees, max_size=4), max_size=5)
file_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    rows.map(lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()),
    rows.map(lambda rs: json.dumps(rs).encode()),
    st.lists(st.lists(st.text(max_size=8), max_size=4), max_size=5).map(lambda t: "\n".join(",".join(r) for r in t).encode()),
)


@FUZZ
@given(content=file_bytes, suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       columns=st.dictionaries(st.sampled_from(["abstract", "summary"]), st.sampled_from(["abstract", "summary", "text", "x"]),
                               max_size=2),
       cut=st.integers(0, 300))
def test_data_files_give_rows_or_a_data_error(content, suffix, columns, cut):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train{suffix}"
        path.write_bytes(content[: max(cut, len(content) // 2)])  # sometimes truncated mid-row
        try:
            loaded = read_rows(path, columns)
            check_columns(loaded, ["abstract", "summary"], str(path))
        except DataError as exc:
            assert str(exc).startswith(str(path)) or "row" in str(exc), str(exc)
            return
        assert loaded and all(isinstance(r, dict) and r["summary"] is not None for r in loaded)
