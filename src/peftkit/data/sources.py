"""Rows from local files, `datasets` folders and the built-in aclsum tasks; column checks.

Every problem a user can fix ends in a `DataError` naming the file, the row and the column.

Example:
    >>> rows = read_rows("data/train.jsonl", columns={"abstract": "body"})
    >>> rows[0]["abstract"]
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError

ACLSUM_ASPECTS = ("outcome", "challenge", "approach")
BUILTIN_DATASETS = {f"aclsum/{a}": a for a in ACLSUM_ASPECTS}


# -- one reader per format -----------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {lineno} (line {lineno}) is not valid JSON ({exc.msg}); each line must be one object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {lineno} (line {lineno}) is {type(row).__name__}, expected a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1} is {type(row).__name__}, expected a JSON object")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for i, row in enumerate(reader, 1):
            if None in row:  # more cells than header names
                raise DataError(f"{path}: row {i} (line {reader.line_num}) has more cells than the header's "
                            f"{len(reader.fieldnames or [])} columns; quote cells that hold commas")
            rows.append(dict(row))
        return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'peftkit[data]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({exc}); re-export it, or use .jsonl") from None


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a datasets folder needs `datasets` (pip install 'peftkit[data]')") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({exc}); "
                        "point data.train at a .jsonl, .json, .csv or .parquet file, or at such a folder") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split ({list(ds.keys())}); point at one split")
        ds = ds["train"]
    return ds.to_list()


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def rename_columns(rows: list[dict[str, Any]], columns: Mapping[str, str], source: str) -> list[dict[str, Any]]:
    """Apply a column mapping {name peftkit reads: column in the file}, e.g. {"abstract": "body"}."""
    if not columns:
        return rows
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        for name, column in columns.items():
            if column not in row:
                raise DataError(f"{source}: row {i + 1} has no column {column!r} (mapped to {name!r} by data.columns); "
                                f"columns: {', '.join(map(str, row))}")
            row[name] = row.pop(column) if column != name else row[column]
        out.append(row)
    return out


def read_rows(path: str | Path, columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .csv / .parquet file or a `datasets` save_to_disk folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found; check the path (relative paths start in the current folder)")
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif path.suffix.lower() in READERS:
        try:
            rows = READERS[path.suffix.lower()](path)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets folder")
    if not rows:
        raise DataError(f"{path}: no rows; the dataset is empty: add examples (for .jsonl, one JSON object per line)")
    return rename_columns(rows, columns or {}, str(path))


# -- checks per data shape -----------------------------------------------------------------------
def check_columns(rows: Sequence[Mapping[str, Any]], needed: Sequence[str], source: str) -> None:
    """Every row has every `needed` column, non-empty."""
    for i, row in enumerate(rows):
        for column in needed:
            if column not in row:
                raise DataError(f"{source}: row {i + 1} has no column {column!r} (columns: {', '.join(map(str, row))}); "
                                "set data.prompt / data.response / data.template, or map it with data.columns")
            if row[column] is None or (isinstance(row[column], str) and not row[column].strip()):
                raise DataError(f"{source}: row {i + 1}, column {column!r} is empty; fill it or remove the row")


def check_messages(rows: Sequence[Mapping[str, Any]], source: str) -> None:
    """Chat rows: `messages` is a list of {role, content} with at least one assistant turn."""
    for i, row in enumerate(rows):
        messages = row.get("messages")
        where = f"{source}: row {i + 1}, column 'messages'"
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where} must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {j + 1} needs string 'role' and 'content' keys")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn, so nothing to learn")


# -- built-in datasets ---------------------------------------------------------------------------
def _aclsum_dir() -> Path:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in aclsum tasks need the package: pip install --no-deps aclsum==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset"


def aclsum_rows(split: str, aspect: str) -> list[dict[str, Any]]:
    """aclsum papers as rows {id, abstract, summary} for one aspect (challenge / approach / outcome)."""
    file = _aclsum_dir() / f"{'val' if split == 'validation' else split}.jsonl"
    rows = []
    for raw in _read_jsonl(file):
        abstract = " ".join(raw["sentences"]["abstract"])
        rows.append({"id": raw["id"], "abstract": _detokenize(abstract), "summary": raw["summary"][aspect]})
    return rows


def _detokenize(text: str) -> str:
    """aclsum abstracts are space-tokenized ("answer extraction ." -> "answer extraction.")."""
    for a, b in ((" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), ("( ", "("), (" )", ")"), (" 's", "'s"), (" %", "%")):
        text = text.replace(a, b)
    return text
