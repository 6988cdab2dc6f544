"""The `peftkit` command: thin, calls the library. User mistakes exit 2 with a message, no traceback."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import PeftkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning, measured.")
console = Console(stderr=False)
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)]
    )
    logging.getLogger("peftkit").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (default: the built-in default run)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=1 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
) -> None:
    """Fine-tune a model (default: LoRA on SmolLM2-135M, aclsum outcome summaries)."""
    from .config import load_config
    from .train import run_training

    cfg = load_config(config, set_)
    console.print(f"[bold]peftkit train[/]: {cfg.method} on [cyan]{cfg.model}[/], data [cyan]{cfg.data.dataset or cfg.data.train}[/] -> {cfg.output_dir}")
    with _progress() as progress:
        result = run_training(cfg, resume=resume, progress=progress)
    _print_result(result)


def _print_result(result: Any) -> None:
    table = Table(title="run summary", show_header=False)
    rows = [
        ("adapter", str(result.adapter_dir)),
        ("trainable", result.trainable),
        ("steps", str(result.steps)),
        ("wall time (load, train, save, sample)", f"{result.seconds:.1f} s"),
        ("training tokens/s", f"{result.tokens_per_s:.0f}"),
        ("loss first -> last step", f"{result.first_loss:.4f} -> {result.last_loss:.4f}"),
        ("validation loss", "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"),
        ("peak RSS", "n/a" if result.peak_rss_gb is None else f"{result.peak_rss_gb:.2f} GB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if result.samples:
        samples = Table(title="test prompts: base vs tuned", show_lines=True)
        for col in ("reference", "base (adapter disabled)", "tuned"):
            samples.add_column(col, overflow="fold")
        for s in result.samples:
            samples.add_row(s["reference"], s["base"], s["tuned"])
        console.print(samples)


@app.command()
def generate(
    prompt: list[str] = typer.Argument(..., help="Input text(s); each fills the adapter's prompt template."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Adapter folder (finds its base model)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's)."),
    max_new_tokens: int = typer.Option(60, min=1, help="Most new tokens per answer."),
    compare: bool = typer.Option(False, "--compare", help="Also show the base model's answer (adapter disabled)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
) -> None:
    """Generate answers, formatting prompts exactly as the adapter was trained."""
    from .inference import load_for_inference, prompt_rows

    if adapter is None and model is None:
        raise PeftkitError("give --adapter PATH or --model NAME")
    loaded = load_for_inference(adapter, model)
    rows = prompt_rows(loaded.format, prompt)
    answers = loaded.generate(rows, max_new_tokens=max_new_tokens, do_sample=sample)
    base = loaded.generate(rows, max_new_tokens=max_new_tokens, do_sample=sample, base=True) if compare else None
    for i, text in enumerate(prompt):
        console.rule(f"prompt {i + 1}")
        console.print(text if len(text) < 400 else text[:400] + "...", style="dim")
        if base is not None:
            console.print(f"[bold]base:[/] {base[i]}")
        console.print(f"[bold]{'tuned' if adapter else 'answer'}:[/] {answers[i]}")


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="Adapter folder to merge."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged transformers checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's)."),
) -> None:
    """Merge an adapter into its base and write a plain transformers checkpoint (zero-latency inference)."""
    from .inference import merge_to_folder

    path, max_err = merge_to_folder(adapter, out, model)
    console.print(f"merged checkpoint written to [cyan]{path}[/] (max |merged - unmerged| logit difference {max_err:.2e})")
    console.print("load it with: AutoModelForCausalLM.from_pretrained(" + repr(str(path)) + ")")


@app.command()
def inspect(adapter: Path = typer.Argument(..., help="Adapter folder.")) -> None:
    """Show an adapter's method, targets, rank, parameter count, size on disk and template."""
    from .inference import describe_adapter

    table = Table(title=str(adapter), show_header=False)
    for key, value in describe_adapter(adapter).items():
        table.add_row(key, str(value))
    console.print(table)


def main() -> None:
    try:
        app(standalone_mode=False)
    except PeftkitError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors are user mistakes too
        import click

        if isinstance(exc, click.exceptions.UsageError):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
