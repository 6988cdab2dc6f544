"""The bad-input corpus (tests/bad_inputs/*.yaml): every user mistake ends in a clear message, never a traceback.

Each case holds its input files, the command (or HTTP request), the substrings its message must
contain (the thing that is wrong and the fix) and the exit code (2) or HTTP status (4xx). Every case
also checks that nothing on disk changed: the files present before are byte-identical after, and
no file appeared outside the run's own output folders (a pickle payload would leave one).

A case file entry, with `{case}` (the case's folder), `{model}` / `{gpt2}` (tiny base folders),
`{data}` (a valid train.jsonl), `{adapter}` (a valid, or `damage`d, adapter folder) substituted:

    - id: lora-rank-zero
      config: {lora: {r: 0}}              # merged into a tiny valid run config, written to {case}/cfg.yaml
      argv: [train, "{case}/cfg.yaml"]    # default
      expect: ["lora.r", "at least 1"]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import build_model, tiny_run_config
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from serving_helpers import save_adapter, single_thread  # noqa: F401 (autouse fixture)

from peftkit import cli
from peftkit.serve import Engine, ServeSettings, create_app

CORPUS = Path(__file__).parent / "bad_inputs"
OUTPUT_FOLDERS = ("run", "out")
"""Folders under a case a command may create (its output); anything else new is damage."""
KEY = "bad-inputs-key"


def load_cases(kind: str) -> list[Any]:
    cases = []
    for file in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(file.read_text(encoding="utf-8")):
            if ("request" in case) == (kind == "http"):
                cases.append(pytest.param(case, id=f"{file.stem}/{case['id']}"))
    return cases


CLI_CASES = load_cases("cli")
HTTP_CASES = load_cases("http")


def test_the_corpus_is_large_and_well_formed():
    ids = [c.id for c in CLI_CASES + HTTP_CASES]
    assert len(ids) >= 70 and len(set(ids)) == len(ids)
    for param in CLI_CASES + HTTP_CASES:
        case = param.values[0]
        assert len(case["expect"]) >= 2, f"{param.id}: name the thing and the fix"
        assert 400 <= case.get("status", 400) < 500 and case.get("code", 2) == 2


# -- building a case's files ---------------------------------------------------------------------------
def fill(value: Any, places: dict[str, str]) -> Any:
    """`{name}` placeholders substituted in every string of a nested value."""
    if isinstance(value, str):
        return re.sub(r"\{(case|model|gpt2|data|adapter|outside)\}", lambda m: places[m.group(1)], value)
    if isinstance(value, list):
        return [fill(v, places) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, places) for k, v in value.items()}
    return value


def file_bytes(spec: Any) -> bytes:
    """A file's content: text, or {latin1: text}, {hex: ...}, {repeat: text, times: n}."""
    if isinstance(spec, str):
        return spec.encode("utf-8")
    if "latin1" in spec:
        return spec["latin1"].encode("latin-1")
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    return (spec["repeat"] * spec["times"]).encode("utf-8")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _first_tensor(tensors: dict[str, torch.Tensor], part: str = "lora_A") -> str:
    return min(k for k in tensors if part in k)


def _edit_tensors(folder: Path, edit: Any) -> None:
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(folder: Path, **changes: Any) -> None:
    file = folder / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        raw.pop(key)
    file.write_text(json.dumps(raw))


class Payload:
    """A pickle that creates a file when loaded: refusing it must leave no trace on disk."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.target, "w"))


def _pickle_bin(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"weights": Payload(folder / "PWNED")}, folder / "adapter_model.bin")


def _pickle_as_safetensors(folder: Path) -> None:
    import pickle

    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps(Payload(folder / "PWNED")))


def _wrong_shape(t: dict[str, torch.Tensor]) -> None:
    key = _first_tensor(t)
    t[key] = torch.zeros(t[key].shape[0] + 3, t[key].shape[1])


DAMAGE = {
    "delete_weights": lambda f: (f / "adapter_model.safetensors").unlink(),
    "truncate_weights": lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:200]),
    "empty_weights": lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
    "nan_weights": lambda f: _edit_tensors(f, lambda t: t[_first_tensor(t, "lora_B")].fill_(float("nan"))),
    "inf_weights": lambda f: _edit_tensors(f, lambda t: t[_first_tensor(t)].view(-1)[0].fill_(float("inf"))),
    "wrong_shape": lambda f: _edit_tensors(f, _wrong_shape),
    "missing_tensor": lambda f: _edit_tensors(f, lambda t: t.pop(_first_tensor(t))),
    "int_weights": lambda f: _edit_tensors(f, lambda t: t.update({k: v.to(torch.int64) for k, v in t.items()})),
    "pickle_bin": _pickle_bin,
    "pickle_as_safetensors": _pickle_as_safetensors,
    "delete_config": lambda f: (f / "adapter_config.json").unlink(),
    "malformed_config": lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,'),
    "config_is_a_list": lambda f: (f / "adapter_config.json").write_text("[1, 2]"),
    "unknown_peft_type": lambda f: _edit_config(f, peft_type="IA3_PLUS"),
    "rank_zero": lambda f: _edit_config(f, r=0),
    "rank_pattern": lambda f: _edit_config(f, rank_pattern={"q_proj": 8}),
    "no_base": lambda f: _edit_config(f, base_model_name_or_path=None),
    "missing_base": lambda f: _edit_config(f, base_model_name_or_path=str(f.parent / "no-such-base")),
    "malformed_sidecar": lambda f: (f / "peftkit.json").write_text("{format_version: 1"),
}


def make_adapter(folder: Path, clean: dict[str, Path], spec: dict[str, Any]) -> Path:
    """A copy of a valid adapter (trained on the tiny `from` base, default llama), then its `base` and `damage`."""
    shutil.copytree(clean[spec.get("from", "llama")], folder)
    if spec.get("base") is not None:
        _edit_config(folder, base_model_name_or_path=spec["base"])
    if spec.get("damage"):
        DAMAGE[spec["damage"]](folder)
    return folder


# -- what "nothing damaged" means ------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """Path -> sha256 of every file (and link target) under the roots."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_undamaged(before: dict[str, str], after: dict[str, str], case_dir: Path | None) -> None:
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"files changed or vanished: {changed}"
    allowed = tuple(str(case_dir / name) + os.sep for name in OUTPUT_FOLDERS) if case_dir else ()
    appeared = sorted(p for p in set(after) - set(before) if not p.startswith(allowed))
    assert not appeared, f"files appeared: {appeared}"


def squash(text: str) -> str:
    """Whitespace removed: rich wraps long messages at the terminal width."""
    return re.sub(r"\s+", "", text)


def assert_message(output: str, expect: list[str]) -> None:
    assert "Traceback" not in output, output
    for part in expect:
        assert squash(part) in squash(output), f"{part!r} not in the message:\n{output}"


# -- CLI cases -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_adapters(tmp_path_factory, tokenizer, model_dirs) -> dict[str, Path]:
    """Valid LoRA adapters (non-zero B) on the tiny Llama and GPT-2 bases, each recording its base's folder."""
    root = tmp_path_factory.mktemp("clean")
    folders = {
        "llama": save_adapter(root / "llama", len(tokenizer), 4, ["q_proj", "v_proj"], seed=1),
        "gpt2": save_adapter(root / "gpt2", len(tokenizer), 4, ["c_attn"], seed=1, kind="gpt2"),
    }
    for kind, folder in folders.items():
        _edit_config(folder, base_model_name_or_path=str(model_dirs[kind]))
    return folders


def build_cli_case(case: dict[str, Any], case_dir: Path, model_dirs: dict[str, Path], clean: dict[str, Path], rows: list) -> list[str]:
    """Write the case's files; return its argv."""
    data = case_dir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    places = {"case": str(case_dir), "model": str(model_dirs["llama"]), "gpt2": str(model_dirs["gpt2"]),
              "data": str(data), "adapter": str(case_dir / "adapter"), "outside": str(case_dir)}
    if "adapter" in case:
        make_adapter(case_dir / "adapter", clean, fill(case["adapter"], places))
    for name, content in fill(case.get("files", {}), places).items():
        path = case_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(file_bytes(content))
    for name in case.get("dirs", []):
        (case_dir / name).mkdir(parents=True, exist_ok=True)
    if "config" in case or "argv" not in case:
        config = deep_merge(tiny_run_config(model_dirs["llama"], data, case_dir / "run"), fill(case.get("config", {}), places))
        (case_dir / "cfg.yaml").write_text(yaml.safe_dump(config))
    return fill(case.get("argv", ["train", "{case}/cfg.yaml"]), places)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(case, tmp_path, model_dirs, clean_adapters, rows, capsys):
    argv = build_cli_case(case, tmp_path, model_dirs, clean_adapters, rows)
    before = snapshot(tmp_path, *model_dirs.values(), *clean_adapters.values())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == case.get("code", 2), out.out + out.err
    assert_message(out.out + out.err, case["expect"])
    assert_undamaged(before, snapshot(tmp_path, *model_dirs.values(), *clean_adapters.values()), tmp_path)


SUBPROCESS_IDS = ("config/yaml-malformed", "adapters/pickle-in-place-of-safetensors")


def test_cli_bad_inputs_in_real_processes(tmp_path, model_dirs, clean_adapters, rows):
    """Some cases as a user runs them (fresh interpreters, side by side): exit 2, one message, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    runs = []
    for param in [c for c in CLI_CASES if c.id in SUBPROCESS_IDS]:
        case_dir = tmp_path / param.id.replace("/", "_")
        case_dir.mkdir()
        argv = build_cli_case(param.values[0], case_dir, model_dirs, clean_adapters, rows)
        command = [sys.executable, "-m", "peftkit.cli", *argv]
        runs.append((param.values[0], case_dir, snapshot(case_dir),
                     subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
    assert len(runs) == len(SUBPROCESS_IDS)
    for case, case_dir, before, process in runs:
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 2, output
        assert_message(output, case["expect"])
        assert_undamaged(before, snapshot(case_dir), case_dir)


# -- HTTP cases ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer, model_dirs, clean_adapters):
    """A tiny served base with two adapters, an adapter root, and a valid adapter outside that root."""
    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("outcome", "challenge"):
        shutil.copytree(clean_adapters["llama"], root / name)
    shutil.copytree(clean_adapters["llama"], outside / "adapter")
    (outside / "secret.txt").write_text("not for clients")
    settings = ServeSettings(api_key=KEY, adapter_root=root, max_wait_ms=1, max_prompt_tokens=64, max_tokens_limit=32)
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny-base", settings)
    engine.load_adapter("outcome", root / "outcome")
    engine.load_adapter("challenge", root / "challenge")
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        yield client, root, outside, model_dirs


def build_http_case(case: dict[str, Any], root: Path, outside: Path, clean: dict[str, Path], model_dirs: dict[str, Path]) -> dict[str, Any]:
    """Lay out the case's adapter folder / links under the root; return the request."""
    folder = root / case["id"].replace("-", "_")
    places = {"case": folder.name, "model": str(model_dirs["llama"]), "gpt2": str(model_dirs["gpt2"]), "data": "",
              "adapter": folder.name, "outside": str(outside)}
    if "adapter" in case and not folder.exists():
        make_adapter(folder, clean, fill(case["adapter"], places))
    for link, target in fill(case.get("links", {}), places).items():
        path = root / link
        if not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
    return fill(case["request"], places)


@pytest.mark.parametrize("case", HTTP_CASES)
def test_http_bad_input(case, server, clean_adapters):
    client, root, outside, model_dirs = server
    request = build_http_case(case, root, outside, clean_adapters, model_dirs)
    headers = {"Authorization": f"Bearer {KEY}", **request.get("headers", {})}
    headers = {k: v for k, v in headers.items() if v is not None}
    before = snapshot(root, outside)
    models_before = served_models(client)
    body = request.get("body")
    content = file_bytes(body) if body is not None else None
    r = client.request(request.get("method", "POST"), request["path"], headers=headers, content=content, json=request.get("json"))
    assert r.status_code == case["status"], r.text
    error = r.json()["error"]
    assert error["type"] != "server_error"
    assert_message(error["message"], case["expect"])
    assert_undamaged(before, snapshot(root, outside), None)
    assert served_models(client) == models_before, "a refused request changed what is served"


def served_models(client: TestClient) -> list[str]:
    return [m["id"] for m in client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]]
