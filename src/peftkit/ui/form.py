"""The New-run form: fields generated from the config dataclasses, form values -> a validated config.

Every field of `RunConfig` becomes one input, grouped by section, with the field's docstring as
help. Values come back as the user typed them and go through the same parsing as
`peftkit train --set key=value` (YAML for numbers, lists and mappings; strings as typed) and the
same validation (`config_from_dict`), so the page shows exactly the messages the CLI prints.

Example:
    >>> sections = form_sections()
    >>> raw = form_to_raw({"method": "lora", "lora.r": "8"})
    >>> cfg = config_from_dict(raw, source="form")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..config import RunConfig, apply_override, field_docs

TOP_SECTION = "run"
"""The section holding RunConfig's own scalar fields (model, task, method)."""
METHOD_SECTIONS = {"lora": ("lora",), "qlora": ("lora", "quant")}
"""Sections a method reads besides the one named after it (QLoRA is LoRA on a quantized base)."""
HIDDEN_KEYS = ("output_dir",)
"""Set from the run's name (a folder under --runs), never typed."""


@dataclass(frozen=True)
class FormField:
    """One input of the form."""

    key: str
    """Dotted config key, e.g. `lora.r`."""
    kind: Literal["text", "number", "checkbox", "select", "yaml"]
    default: Any
    """What the input shows at first: text, or a bool for a checkbox."""
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False
    """Empty means null."""


@dataclass(frozen=True)
class FormSection:
    """A group of fields: `run`, or one nested config dataclass (`data`, `lora`, `train`, ...)."""

    name: str
    help: str
    fields: tuple[FormField, ...]


def _without_none(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); anything else -> (tp, False) unless it is a wider union."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def field_kind(tp: Any) -> tuple[str, tuple[str, ...], bool]:
    """(input kind, select choices, optional) for an annotation."""
    inner, optional = _without_none(tp)
    if inner is bool:
        return "checkbox", (), optional
    if get_origin(inner) is Literal:
        return "select", tuple(str(a) for a in get_args(inner)), optional
    if inner in (int, float):
        return "number", (), optional
    if inner is str:
        return "text", (), optional
    return "yaml", (), optional


def shown_default(kind: str, value: Any) -> Any:
    """A default as its input shows it."""
    if kind == "checkbox":
        return bool(value)
    if value is None:
        return ""
    if kind == "yaml":
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
    return str(value)


def _section(name: str, cls: type, help_text: str) -> FormSection:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    fields = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or f.name in HIDDEN_KEYS:
            continue
        kind, choices, optional = field_kind(hints[f.name])
        key = f.name if name == TOP_SECTION else f"{name}.{f.name}"
        fields.append(FormField(key, kind, shown_default(kind, getattr(defaults, f.name)),  # type: ignore[arg-type]
                                docs.get(f.name, ""), choices, optional))
    return FormSection(name, help_text, tuple(fields))


def form_sections() -> list[FormSection]:
    """`run` (model, task, method), then one section per nested config, in RunConfig's order."""
    hints = typing.get_type_hints(RunConfig)
    sections = [_section(TOP_SECTION, RunConfig, (RunConfig.__doc__ or "").strip())]
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            cls = hints[f.name]
            sections.append(_section(f.name, cls, (cls.__doc__ or "").strip()))
    return sections


def section_owner(section: str) -> tuple[str, tuple[str, ...]] | None:
    """("method", methods) or ("task", tasks) for a section shown only for those; None: always shown."""
    methods = tuple(m for m in _literal_values("method") if section == m or section in METHOD_SECTIONS.get(m, ()))
    if methods:
        return "method", methods
    if section in set(_literal_values("task")) - {"generation"}:
        return "task", (section,)
    return None


def section_shown(section: str, method: str, task: str) -> bool:
    """Is a section relevant to this method and task?"""
    owner = section_owner(section)
    if owner is None:
        return True
    return (method if owner[0] == "method" else task) in owner[1]


def _literal_values(key: str) -> tuple[str, ...]:
    return tuple(str(v) for v in get_args(typing.get_type_hints(RunConfig)[key]))


def _field_index() -> dict[str, FormField]:
    return {f.key: f for s in form_sections() for f in s.fields}


def parse_value(spec: FormField | None, value: Any) -> Any:
    """A form value as the config expects it: strings as typed, everything else read as YAML (like --set)."""
    if isinstance(value, bool) or value is None:
        return value
    if not isinstance(value, str):
        return value  # a JSON number or list posted directly: validated by the config like any other value
    if spec is not None and value.strip() == "" and spec.optional:
        return None
    if spec is not None and (spec.kind == "text" or (spec.kind == "select" and _all_strings(spec))):
        return value
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return value  # the config reports it as the wrong type, with the text quoted


def _all_strings(spec: FormField) -> bool:
    return all(not _looks_numeric(c) for c in spec.choices)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def form_to_raw(values: dict[str, Any]) -> dict[str, Any]:
    """Form values {dotted key: value} -> the nested dict a YAML config would hold."""
    index = _field_index()
    raw: dict[str, Any] = {}
    for key, value in values.items():
        apply_override(raw, str(key).split("."), parse_value(index.get(str(key)), value))
    return raw


def changed_from_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Only the keys whose value differs from RunConfig's default: the YAML a user would write."""
    defaults = RunConfig().to_dict()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = {k: v for k, v in value.items() if default.get(k, object()) != v}
            if nested:
                out[key] = nested
        elif value != default:
            out[key] = value
    return out


def config_yaml(raw: dict[str, Any]) -> str:
    """The settings as a config file: `peftkit train this.yaml` makes the same run."""
    return yaml.safe_dump(changed_from_defaults(raw), sort_keys=False, allow_unicode=True, width=100)
