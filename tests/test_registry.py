"""The method registry drives the config schema, and peftkit's imports (also those inside functions) form no cycle."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from peftkit.config import RunConfig, config_from_dict, field_docs
from peftkit.errors import ConfigError
from peftkit.methods.registry import METHODS, PEFT_TYPES, SECTIONS, get_method, method_for_config

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"


def test_run_config_has_every_registry_section_and_method_choice():
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, cls in SECTIONS.items():
        assert fields[name].default_factory is cls  # type: ignore[misc]
    assert typing.get_args(typing.get_type_hints(RunConfig)["method"]) == tuple(METHODS)
    docs = field_docs(RunConfig)
    assert all(docs[name] for name in SECTIONS) and "method" in docs


def test_every_method_names_its_section_and_peft_type():
    for name, method in METHODS.items():
        if method.section is None:
            assert method.prepare_base is not None and method.attach is None  # full: no adapter
            continue
        cfg = config_from_dict({"method": name})
        assert isinstance(getattr(cfg, method.section), method.config_cls)
        assert PEFT_TYPES[method.peft_type].config_cls is method.config_cls
    assert method_for_config(METHODS["qlora"].config_cls()) is METHODS["lora"]  # a QLoRA adapter is a LoRA file


def test_unknown_method_lists_the_registry():
    with pytest.raises(ConfigError, match="ia3"):
        config_from_dict({"method": "ia4"})
    with pytest.raises(ConfigError, match="choose one of: lora, qlora"):
        get_method("ia4")


def test_capabilities_decide_what_the_config_refuses():
    with pytest.raises(ConfigError, match=r"data.packing: method 'prompt_tuning' cannot use packed sequences"):
        config_from_dict({"method": "prompt_tuning", "data": {"packing": True}})
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: prefix tuning"):
        config_from_dict({"method": "prefix_tuning", "train": {"gradient_checkpointing": True}})
    with pytest.raises(ConfigError, match="data.add_special_tokens: .*use lora or qlora or ia3 or full"):
        config_from_dict({"method": "bottleneck", "data": {"add_special_tokens": ["<x>"]}})
    with pytest.raises(ConfigError, match=r"lora.r: must be at least 1.*\n.*bottleneck.reduction_factor"):
        config_from_dict({"lora": {"r": 0}, "bottleneck": {"reduction_factor": 0}})


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


LAZY_BY_DESIGN = {"peftkit.cli"}
"""cli.py imports inside its commands so `peftkit --help` starts fast; nothing imports cli."""


def _import_edges() -> dict[str, set[str]]:
    """Module -> peftkit modules it imports anywhere (an import inside a function counts: hiding a cycle there
    is what this test forbids), plus the packages whose __init__ runs first (importing `peftkit.methods.base`
    from outside runs `peftkit/methods/__init__.py`)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())) if name not in LAZY_BY_DESIGN else []:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                submodules = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in files}
                targets |= submodules if not node.module and submodules else {module} | submodules
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftkit"):
                targets.add(node.module)  # type: ignore[arg-type]
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}  # its packages (and itself)
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts))} - own - {"peftkit"}
        edges[name] = {t for t in targets if t in files and t != name}
    return edges


def test_imports_are_acyclic():
    edges = _import_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
