"""Data: sources, templates, tokenization with loss masks, batching."""

from .datasets import IGNORE_INDEX, TaskData, collate, load_task, read_rows, tokenize_task_rows
from .templates import PromptFormat, format_prompt

__all__ = ["IGNORE_INDEX", "PromptFormat", "TaskData", "collate", "format_prompt", "load_task", "read_rows", "tokenize_task_rows"]
