"""Export to the llama.cpp / Ollama world: GGUF files written in pure Python with the `gguf` package.

Example:
    >>> from peftkit.export import export_gguf, export_lora_gguf, describe_gguf
    >>> export_gguf("runs/default/adapter", "tuned.gguf", dtype="q8_0", ollama=True)
    >>> export_lora_gguf("runs/default/adapter", "adapter.gguf")
    >>> describe_gguf("tuned.gguf")["chat template"]
    'yes'
"""

from .describe import describe_gguf
from .gguf_export import ExportResult, export_gguf, export_lora_gguf
from .gguf_model import DTYPES
from .layouts import GGUF_LAYOUTS

__all__ = ["DTYPES", "GGUF_LAYOUTS", "ExportResult", "describe_gguf", "export_gguf", "export_lora_gguf"]
