"""What a GGUF file holds, read from its header: `peftkit inspect FILE.gguf`.

Example:
    >>> describe_gguf("out/model.gguf")["kind"]
    'model'
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from ..errors import ExportError


def read_gguf(path: str | Path) -> gguf.GGUFReader:
    """The file's reader, or a message when it is missing or not GGUF."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise ExportError(f"{path}: not a readable GGUF file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """A metadata value (str, number, or list), or None when the key is absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """Architecture, model or adapter, tensor count and types, context, vocabulary, special ids, chat template."""
    path = Path(path)
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture")
    kind = field_value(reader, "general.type") or "model"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    info: dict[str, Any] = {
        "architecture": arch,
        "kind": f"{kind} ({field_value(reader, 'adapter.type')})" if kind == "adapter" else kind,
        "name": field_value(reader, "general.name"),
        "tensors": len(reader.tensors),
        "tensor types": ", ".join(f"{name} x{count}" for name, count in types.most_common()),
        "file type": _file_type(field_value(reader, "general.file_type")),
        "parameters": f"{sum(int(t.n_elements) for t in reader.tensors):,d}",
        "size on disk": f"{path.stat().st_size / 2**20:.1f} MiB",
    }
    if kind == "adapter":
        info["lora alpha"] = field_value(reader, gguf.Keys.Adapter.LORA_ALPHA)
    else:
        info.update({
            "context length": field_value(reader, f"{arch}.context_length"),
            "layers": field_value(reader, f"{arch}.block_count"),
            "vocabulary": len(reader.get_field("tokenizer.ggml.tokens").data) if reader.get_field("tokenizer.ggml.tokens") else 0,
            "tokenizer": f"{field_value(reader, 'tokenizer.ggml.model')} (pre: {field_value(reader, 'tokenizer.ggml.pre')})",
            "bos / eos / pad ids": " / ".join(str(field_value(reader, f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "padding")),
            "chat template": "yes" if field_value(reader, "tokenizer.chat_template") else "no",
        })
    info.update({key: value for key, value in ((k, field_value(reader, k)) for k in reader.fields if k.startswith("peftkit."))})
    return info


def _file_type(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)
