"""Data: sources, templates, tokenization with loss masks, mixtures, batching and packing."""

from .batching import IGNORE_INDEX, block_causal_mask, collate, pack_examples, packed_example
from .datasets import TaskData, load_task, load_tasks, prompt_ids, tokenize_task_rows
from .sources import read_rows
from .templates import PromptFormat, format_prompt

__all__ = [
    "IGNORE_INDEX", "PromptFormat", "TaskData", "block_causal_mask", "collate", "format_prompt", "load_task", "load_tasks",
    "pack_examples", "packed_example", "prompt_ids", "read_rows", "tokenize_task_rows",
]
