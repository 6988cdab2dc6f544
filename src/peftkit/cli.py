"""The `peftkit` command: thin, calls the library. User mistakes exit 2 with a message, no traceback."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .errors import PeftkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning, measured.")
console = Console(stderr=False)
err_console = Console(stderr=True)
console.soft_wrap = not console.is_terminal  # a log or a pipe has no width: lines are never cut at 80 columns


def _setup_logging(verbose: bool) -> None:
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False)
    else:  # a log file: one plain line per message, not rich's 80-column layout
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
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


class _LossColumn(ProgressColumn):
    """`loss 2.3456  812 tok/s`, or `starting` before the first step is done (no loss yet)."""

    def render(self, task: Any) -> Text:
        loss = task.fields.get("loss", float("nan"))
        if math.isnan(loss):  # no step finished yet
            return Text("starting")
        return Text(f"loss {loss:.4f}  {task.fields.get('tps', 0.0):.0f} tok/s")


def _progress() -> Any:
    """A live bar on a terminal; in a log or a pipe, a line every few steps or seconds (`StepLog`)."""
    if not console.is_terminal:
        return _step_log()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        _LossColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )


def _step_log() -> Any:
    from .train.logs import StepLog

    return StepLog(lambda line: console.print(line, markup=False, highlight=False))


def _show_table(table: tuple[list[str], list[list[str]]], title: str, show_header: bool = True, lines: bool = False) -> None:
    """A rich table on a terminal; elsewhere a Markdown table (as report.md), readable at any width."""
    from .eval.report import markdown_table

    header, rows = table
    if not console.is_terminal:
        console.print(f"\n### {title}\n\n{markdown_table(table)}\n", markup=False, highlight=False)
        return
    shown = Table(title=title, show_header=show_header, show_lines=lines)
    for column in header:
        shown.add_column(column, overflow="fold")
    for row in rows:
        shown.add_row(*row)
    console.print(shown)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (default: the built-in default run)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=1 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
) -> None:
    """Fine-tune a model (default: LoRA on SmolLM2-135M, aclsum outcome summaries).

    Your own data: a .jsonl file, one JSON object per line, e.g. {"abstract": "We study ...", "summary": "We find ..."}

    peftkit train --set data.train=papers.jsonl --set data.prompt={abstract} --set data.response=summary

    data.prompt: a column, or a template over the columns ("{title}: {abstract}"); data.response: the column to learn (the loss is on it). A file replaces the built-in dataset. Validation and test rows are held out (data.val_ratio, data.test_ratio) unless data.validation / data.test name files. Also .csv, .json, .parquet, chat "messages" and plain "text" columns: see the README, section "Data format".
    """
    from .config import load_config
    from .train import run_training

    cfg = load_config(config, set_)
    if cfg.task != "generation":
        _train_encoder(cfg, resume)
        return
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    if not main_process:
        run_training(cfg, resume=resume)
        return
    console.print(f"[bold]peftkit train[/]: {cfg.method} on [cyan]{cfg.model}[/], data [cyan]{_data_name(cfg)}[/] -> {cfg.output_dir}")
    with _progress() as progress:
        result = run_training(cfg, resume=resume, progress=progress)
    _print_result(result)


def _data_name(cfg: Any) -> str:
    """What trains: the built-in dataset, the training file, or the mixture's tasks."""
    if cfg.data.mixture:
        return "mixture of " + ", ".join(m.name or m.dataset or Path(m.train).stem for m in cfg.data.mixture)
    return str(cfg.data.train or cfg.data.dataset)


def _train_encoder(cfg: Any, resume: bool) -> None:
    """`task: embedding | classification`: LoRA on an encoder, then base vs adapter on the test split."""
    from .train import run_training

    console.print(f"[bold]peftkit train[/]: {cfg.task} with {cfg.method} on [cyan]{cfg.model}[/], data "
                  f"[cyan]{_data_name(cfg)}[/] -> {cfg.output_dir}")
    with _progress() as progress:
        result = run_training(cfg, resume=resume, progress=progress)
    rows = [["adapter", str(result.adapter_dir)], ["trainable", result.trainable], ["steps", str(result.steps)],
            ["wall time (load, train, save, score)", f"{result.seconds:.1f} s"],
            ["training tokens/s", f"{result.tokens_per_s:.0f}"],
            ["loss first -> last step", f"{result.first_loss:.4f} -> {result.last_loss:.4f}"],
            ["peak RSS", "n/a" if result.peak_rss_gb is None else f"{result.peak_rss_gb:.2f} GB"]]
    _show_table((["field", "value"], rows), "run summary", show_header=False)
    if result.test:
        _print_encoder_scores({"task": result.task, "systems": {"base": result.test["base"], "adapter": result.test["adapter"]}},
                              f"{result.split} split: base encoder vs adapter")


def _print_encoder_scores(results: dict[str, Any], title: str) -> None:
    from .tasks.evaluate import results_table

    _show_table(results_table(results), title)


def _print_result(result: Any) -> None:
    rows = [
        ("adapter", str(result.adapter_dir)),
        ("trainable", result.trainable),
        ("steps", str(result.steps)),
        ("wall time (load, train, save, sample)", f"{result.seconds:.1f} s"),
        ("training tokens/s", f"{result.tokens_per_s:.0f}"),
        ("tokens trained (padding)", f"{result.train_tokens:,d} ({100 * result.padding_fraction:.1f}% of positions padded)"),
        ("loss first -> last step", f"{result.first_loss:.4f} -> {result.last_loss:.4f}"),
        ("validation loss (last)", "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"),
        (f"best validation {result.select_by}", "n/a" if result.best_score is None
         else f"{result.best_score:.4f} at step {result.best_step}" + (" (stopped early)" if result.stopped_early else "")),
        ("loss curve", str(result.loss_curve or "n/a")),
        ("peak RSS", "n/a" if result.peak_rss_gb is None else f"{result.peak_rss_gb:.2f} GB"),
    ]
    _show_table((["field", "value"], [list(row) for row in rows]), "run summary", show_header=False)
    if result.samples:
        _show_table((["reference", "base (adapter disabled)", "tuned"], [[s["reference"], s["base"], s["tuned"]] for s in result.samples]),
                    "test prompts: base vs tuned", lines=True)
        console.print(_samples_note(result.samples[0]["settings"]), highlight=False)


def _samples_note(settings: str) -> str:
    """The samples' decoding, and whether `peftkit eval` (by default) decodes the same way."""
    from .generate import Decoding

    evaluation = f"{Decoding().describe()}, {EVAL_PRECISION} weights"
    if settings == evaluation:
        return f"decoded as `peftkit eval` decodes by default ({settings}): it answers these papers the same way"
    return (f"decoded with: {settings}; `peftkit eval` by default: {evaluation}, so its answers can differ "
            "(match them with its options --max-new-tokens, --repetition-penalty, --no-repeat-ngram-size, --sample)")


@app.command()
def generate(
    prompt: list[str] = typer.Argument(..., help="Input text(s); each fills the adapter's prompt template."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Adapter folder (finds its base model)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's)."),
    max_new_tokens: int = typer.Option(60, min=1, help="Most new tokens per answer."),
    compare: bool = typer.Option(False, "--compare", help="Also show the base model's answer (adapter disabled)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    repetition_penalty: float = typer.Option(1.0, min=0.01, help="Divide the logits of tokens already in the text by this (1.0: off)."),
    no_repeat_ngram_size: int = typer.Option(0, min=0, help="Never repeat an N-gram (0: off)."),
) -> None:
    """Generate answers, formatting prompts exactly as the adapter was trained."""
    from .artifacts import load_artifact
    from .inference import prompt_rows

    if adapter is None and model is None:
        raise PeftkitError("give --adapter PATH or --model NAME")
    loaded = load_artifact(adapter, model, precision="auto")  # the host's faster dtype: bf16 only where native
    rows = prompt_rows(loaded.format, prompt)
    decoding = {"max_new_tokens": max_new_tokens, "do_sample": sample, "repetition_penalty": repetition_penalty,
                "no_repeat_ngram_size": no_repeat_ngram_size}
    answers = loaded.generate(rows, **decoding)
    base = loaded.generate(rows, **decoding, base=True) if compare else None
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
def inspect(
    adapter: Path = typer.Argument(..., help="Adapter folder, or a .gguf file."),
    nearest: int = typer.Option(5, min=0, help="Soft prompts: show each virtual token's N nearest vocabulary tokens (0: skip)."),
) -> None:
    """Show an adapter's method, targets, rank, parameter count, size on disk and template (or a GGUF file's header)."""
    from .export import describe_gguf
    from .artifacts import describe_artifact

    info = describe_gguf(adapter) if adapter.suffix == ".gguf" else describe_artifact(adapter)
    _show_table((["field", "value"], [[key, str(value)] for key, value in info.items()]), str(adapter), show_header=False)
    if nearest and info.get("peft_type") == "PROMPT_TUNING":
        _print_nearest_tokens(adapter, nearest)


def _print_nearest_tokens(adapter: Path, k: int) -> None:
    """Loads the base model: a soft prompt is read against the base's input embedding matrix."""
    from .adapters import AdaptedModel
    from .methods.prompt_tuning import soft_prompt_neighbours

    adapted, tokenizer = AdaptedModel.from_pretrained(adapter)
    rows = [[str(index), "   ".join(f"{token!r} {score:.2f}" for token, score in row)]
            for index, row in enumerate(soft_prompt_neighbours(adapted, tokenizer, k=k))]
    _show_table((["virtual token", f"top {k}"], rows), "nearest vocabulary tokens of each virtual token (cosine similarity)")


EVAL_PRECISION = "fp32"
"""`peftkit eval` runs every system in fp32, so its scores do not depend on the machine's bf16 support."""


@app.command("eval")
def eval_(
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="Adapter or full fine-tune folder, or NAME=FOLDER (repeatable)."),
    base: bool = typer.Option(True, "--base/--no-base", help="Include the base model (adapters disabled)."),
    recorded: list[str] = typer.Option([], "--recorded", help="NAME=results.json: that system's outputs from an earlier evaluation, scored again on the same rows (repeatable); a bare results.json: all its systems, and alone it also gives the base model, task and rows."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapters' own)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Built-in task to score (default: the run's own task)."),
    split: str = typer.Option("test", help="Split of the scored task: test or validation."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score the first N examples of each task."),
    held_out: list[str] = typer.Option([], "--held-out", help="Task for forgetting: aclsum/challenge, aclsum/approach, chatterbot."),
    held_out_limit: Optional[int] = typer.Option(None, min=1, help="First N examples of each held-out task (default: --limit)."),
    mc: Optional[Path] = typer.Option(None, "--mc", help="Multiple-choice file (MMLU layout), scored by log-likelihood."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Preference pairs (prompt, chosen, rejected): each system's preference accuracy and reward margin against the base."),
    max_new_tokens: int = typer.Option(60, min=1, help="Most new tokens per answer (generation stops at EOS)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts generated together."),
    num_beams: int = typer.Option(1, min=1, help="Beam search with this many beams (1: greedy)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    repetition_penalty: float = typer.Option(1.0, min=0.01, help="Divide the logits of tokens already in the text by this (1.0: off)."),
    no_repeat_ngram_size: int = typer.Option(0, min=0, help="Never repeat an N-gram (0: off)."),
    temperature: float = typer.Option(1.0, min=0.01, help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(1.0, min=0.01, max=1.0, help="Nucleus sampling mass (with --sample)."),
    seed: int = typer.Option(0, help="Seed for sampling and the bootstrap intervals."),
    whole_output: bool = typer.Option(False, "--whole-output", help="Score whole outputs, not only their first line."),
    stemmer: bool = typer.Option(True, "--stemmer/--no-stemmer", help="Porter stemming in ROUGE."),
    out: Path = typer.Option(Path("reports/eval"), "--out", "-o", help="Folder for report.md, report.html, results.json."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Compare the base, adapters and full fine-tunes: ROUGE/BLEU, forgetting, multiple choice, a report."""
    from .eval.evaluate import GenerationSettings, run_evaluation
    from .eval.multiple_choice import read_mc_file
    from .eval.preference import preference_scores, preference_table, read_pair_file
    from .eval.recorded import read_recorded_systems, recorded_run
    from .eval.report import forgetting_rows, mc_table, score_table, write_report
    from .eval.systems import describe_systems
    from .eval.tasks import plan_tasks
    from .tasks.evaluate import encoder_task, evaluate_encoder_adapters

    if adapter and encoder_task(adapter[0]):  # an embedding / classification adapter: retrieval or accuracy scores
        results = evaluate_encoder_adapters(list(adapter), split, limit, model, out, device)
        _print_encoder_scores(results, f"{results['task']}: {results['dataset']} ({split}), base vs adapter")
        console.print(f"results: [cyan]{out / 'results.json'}[/]")
        return
    if recorded and not (adapter or model or dataset or held_out or mc):  # `--recorded FILE` alone: its model, task, rows
        run = recorded_run(recorded[0])
        model, dataset, split, limit = run.model, run.task, run.split, limit or run.limit
    systems = describe_systems(list(adapter), base, model) + [s for spec in recorded for s in read_recorded_systems(spec)]
    pairs_only = pairs is not None and not (dataset or held_out)  # --pairs alone scores the pairs, not the run's own task
    tasks = [] if pairs_only else plan_tasks([s.meta for s in systems], dataset, split, limit, list(held_out), held_out_limit)
    questions = read_mc_file(mc) if mc else None
    pair_rows = read_pair_file(pairs) if pairs else None
    if not tasks and not questions and not pair_rows:
        raise PeftkitError("nothing to score: pass --dataset NAME, an adapter trained by peftkit, --held-out, --mc or --pairs")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams, do_sample=sample,
                                  temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size, seed=seed, first_line=not whole_output,
                                  stemmer=stemmer)
    bar = (Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console) if console.is_terminal else _step_log())
    with bar as progress:
        results = run_evaluation(systems, tasks, settings, questions, str(mc) if mc else None, device, EVAL_PRECISION,
                                 progress=progress)
    if pair_rows:
        results["preference"] = {"source": str(pairs), **preference_scores(systems, pair_rows, device, EVAL_PRECISION)}
    primary = next((t.name for t in tasks if t.primary), None)
    write_report(results, out, title=f"peftkit evaluation: {primary or 'held-out tasks'}")
    if primary:
        _show_table(score_table(results, primary), f"{primary} ({split}, {results['tasks'][primary]['n']} examples)")
    if results["forgetting"]:
        _show_table(forgetting_rows(results), "held-out tasks: change vs base")
    if questions:
        _show_table(mc_table(results), f"multiple choice: {mc}")
    if pair_rows:
        _show_table(preference_table(results["preference"]), f"preference pairs: {pairs} ({results['preference']['n']} pairs)")
    console.print(f"report: [cyan]{out / 'report.html'}[/] (also report.md, results.json)")


@app.command()
def sweep(
    config: Optional[Path] = typer.Argument(None, help="Base YAML config (default: the built-in default run)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the base config (repeatable)."),
    method: list[str] = typer.Option(["lora"], "--method", help="Method to sweep (repeatable)."),
    rank: list[int] = typer.Option([1, 4, 16, 64], "--rank", min=1, help="LoRA rank (repeatable)."),
    lr: list[float] = typer.Option([2e-4], "--lr", help="Learning rate (repeatable)."),
    split: str = typer.Option("validation", help="Split that scores each run (tune on validation, report on test)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score the first N examples."),
    metric: str = typer.Option("rougeL", help="rouge1, rouge2, rougeL, rougeLsum, bleu or exact_match."),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="Folder for the runs and the report."),
) -> None:
    """Train a grid of methods x ranks x learning rates, one after another, and plot score vs rank and size."""
    from .config import load_config
    from .eval.report import sweep_table, write_report
    from .eval.sweep import run_sweep

    if metric not in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "exact_match"):
        raise PeftkitError(f"--metric {metric!r}: choose rouge1, rouge2, rougeL, rougeLsum, bleu or exact_match")
    cfg = load_config(config, set_)
    with _progress() as progress:
        results = run_sweep(cfg, list(method), list(rank), list(lr), out, split, limit, metric, progress=progress)
    write_report(results, out / "report", title=f"peftkit sweep: {_data_name(cfg)}")
    _show_table(sweep_table(results), f"sweep ({metric} on {split})")
    console.print(f"report: [cyan]{out / 'report' / 'report.html'}[/]")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the first adapter's base)."),
    adapter: list[str] = typer.Option([], "--adapter", "-a", help="NAME=PATH of an adapter to serve (repeatable)."),
    merge: bool = typer.Option(False, "--merge", help="Merge the one adapter into the base (zero overhead; nothing else served)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback by default)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PEFTKIT_API_KEY", help="Bearer key; admin endpoints need it (prefer the env var)."),
    adapter_root: Optional[Path] = typer.Option(None, "--adapter-root", help="The only folder admin loads may read from."),
    base_name: Optional[str] = typer.Option(
        None, "--served-model-name", "--base-name", help="Name requests use for the base (default: a built-in's name, a folder's name)."),
    max_batch_size: int = typer.Option(8, min=1, help="Most sequences decoded in one forward pass."),
    max_wait_ms: float = typer.Option(10.0, min=0, help="Static batching: how long a request waits for others to batch with."),
    batching: str = typer.Option("continuous", help="continuous (requests join between decode steps) or static."),
    kv_cache_tokens: int = typer.Option(32768, min=1, help="KV-cache budget in tokens; requests that do not fit wait."),
    max_choices: int = typer.Option(16, min=1, help="Largest n / best_of of one request."),
    drain_seconds: float = typer.Option(10.0, min=0, help="On SIGTERM: how long requests in flight may finish."),
    adapter_dir: Optional[Path] = typer.Option(None, "--adapter-dir", help="Serve every adapter folder under DIR by its name, loaded on first request."),
    max_adapters: int = typer.Option(32, min=1, help="Most adapters resident at once (with --adapter-dir: least recently used evicted)."),
    max_prompt_tokens: int = typer.Option(2048, min=1, help="Longest prompt accepted, in tokens."),
    max_tokens: int = typer.Option(512, min=1, help="Largest max_tokens a request may ask for."),
    max_concurrent: int = typer.Option(64, min=1, help="Requests in flight at once (429 above)."),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body (413 above)."),
    precision: str = typer.Option("auto", help="auto (bf16 where the device computes it natively, else fp32), bf16 or fp32."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Serve the base and adapters over an OpenAI-compatible HTTP API (the request's `model` picks one)."""
    from .serve.server import parse_adapter_specs, run_server
    from .serve.settings import ServeSettings

    settings = ServeSettings(
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens, max_concurrent=max_concurrent, max_body_bytes=max_body_bytes,
        api_key=api_key, adapter_root=adapter_root, batching=batching, kv_cache_tokens=kv_cache_tokens,
        max_choices=max_choices, drain_seconds=drain_seconds, adapter_dir=adapter_dir, max_adapters=max_adapters,
    )
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise PeftkitError(f"--adapter-dir {adapter_dir}: no such folder")
    if batching not in ("continuous", "static"):
        raise PeftkitError(f"--batching {batching!r}: choose continuous or static")
    if adapter_root is not None and not adapter_root.is_dir():
        raise PeftkitError(f"--adapter-root {adapter_root}: no such folder")
    run_server(model, parse_adapter_specs(adapter), settings, host, port, merge, device, precision, base_name)


@app.command()
def combine(
    adapters: list[str] = typer.Argument(..., help="Adapter folders to combine (same base)."),
    weights: list[str] = typer.Option(..., "--weights", "-w", help="One weight per adapter: --weights 0.5 0.5 (or 0.5,0.5)."),
    how: str = typer.Option("svd", "--how", help="linear (same ranks), cat (exact, rank sum) or svd (exact sum, re-factorised)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the new adapter."),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="Rank of an svd combination (default: the largest)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the first adapter's)."),
) -> None:
    """Make a new adapter from a weighted combination of adapters (like PEFT's add_weighted_adapter)."""
    from .combine import HOW, combine_folders, split_weights

    if how not in HOW:
        raise PeftkitError(f"--how {how!r}: choose one of {', '.join(HOW)}")
    folders, numbers = split_weights(adapters, weights)
    path, config = combine_folders(folders, numbers, out, how=how, rank=rank, model=model)  # type: ignore[arg-type]
    console.print(f"combined adapter (rank {config.r}, {how}) written to [cyan]{path}[/]")


@app.command()
def estimate(
    model: Optional[str] = typer.Argument(None, help="Model (default: the config's, smollm2-135m)."),
    method: str = typer.Option("full,lora,qlora", "--method", help="One method or a comma-separated list: full,lora,qlora,..."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config to start from."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set lora.r=8 (repeatable)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Assume batches of this length (a quarter of it "
                                          "targets) instead of tokenizing the config's data."),
) -> None:
    """Estimate training memory (weights, gradients, optimizer states, activations) before training."""
    from .config import load_config
    from .estimate import BatchShape, estimate_memory

    estimates = []
    for name in [m.strip() for m in method.split(",") if m.strip()]:
        cfg = load_config(config, [*set_, f"method={name}", *([f"model={model}"] if model else [])])
        rows = cfg.train.micro_batch_size or cfg.train.batch_size
        batches = [BatchShape(rows, seq_len, rows * seq_len // 4)] if seq_len else None
        estimates.append(estimate_memory(cfg, batches))
    rows = [[label, *[f"{est.rows()[i][1] / 2**30:.2f}" for est in estimates]] for i, (label, _) in enumerate(estimates[0].rows())]
    rows.append(["total", *[f"{est.total / 2**30:.2f}" for est in estimates]])
    rows.append(["trainable parameters", *[f"{est.trainable_params:,d}" for est in estimates]])
    rows.append(["training state / 16-bit weights", *[f"{est.state_vs_weights:.1f}x" for est in estimates]])
    _show_table((["GiB", *[est.method for est in estimates]], rows),
                f"estimated training memory, {estimates[0].batch.rows} x {estimates[0].batch.length} tokens per forward")
    console.print("full fine-tuning keeps a gradient and two Adam states for every weight, plus the activations of "
                  "every layer's input: 12-20x the 16-bit weights in the source material's rule of thumb")


@app.command()
def ui(
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of the runs the UI lists and starts."),
    project: Path = typer.Option(Path("."), "--project", help="Folder whose data files and models the form offers; runs start in it."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (beyond loopback only with --api-key)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PEFTKIT_UI_KEY", help="Key the browser logs in with; required to listen beyond 127.0.0.1."),
) -> None:
    """A local web app: new runs from a form, live curves, stop / resume, a playground, evaluation reports."""
    from .ui.server import run_ui

    run_ui(runs, project, host, port, api_key)


@app.command()
def export(
    source: str = typer.Argument(..., help="Adapter folder, full fine-tune folder, or built-in model name."),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write."),
    format_: str = typer.Option("gguf", "--format", help="Export format: gguf."),
    dtype: str = typer.Option("f16", "--dtype", help="f32, f16, bf16 or q8_0 (vectors and norms stay f32)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Write the LoRA adapter alone, for llama.cpp's --lora over the base's GGUF."),
    ollama: bool = typer.Option(False, "--ollama", help="Also write an Ollama Modelfile beside the GGUF file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Export to GGUF for llama.cpp, Ollama, LM Studio: the merged model (or a full fine-tune), or the LoRA adapter alone."""
    from .export import export_gguf, export_lora_gguf

    if format_ != "gguf":
        raise PeftkitError(f"--format {format_!r}: the only export format is gguf")
    if adapter_only and ollama:
        raise PeftkitError("--ollama writes a Modelfile for the merged model; drop --adapter-only")
    if adapter_only:
        result = export_lora_gguf(source, out, dtype, model, overwrite)
    else:
        result = export_gguf(source, out, dtype, model, overwrite, ollama)
    console.print(f"{result.kind} GGUF ({result.architecture}, {result.dtype}, {result.size_bytes / 2**20:.1f} MiB) "
                  f"written to [cyan]{result.path}[/]")
    if result.merge_max_logit_error is not None:
        console.print(f"merged the adapter first: max |merged - unmerged| logit difference {result.merge_max_logit_error:.2e}")
    if result.modelfile is not None:
        console.print(f"Ollama: ollama create NAME -f {result.modelfile} && ollama run NAME")
    console.print(f"llama.cpp: llama-cli -m BASE.gguf --lora {result.path}  (BASE.gguf: peftkit export BASE --out BASE.gguf)"
                  if adapter_only else f"llama.cpp: llama-cli -m {result.path}")


def main(argv: Optional[list[str]] = None) -> None:
    """Run the command line (`argv`: the arguments after `peftkit`; default: sys.argv)."""
    try:
        app(args=argv, standalone_mode=False)
    except PeftkitError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors are user mistakes too (typer may vendor its own click)
        import click
        from typer.exceptions import TyperException

        if isinstance(exc, (click.exceptions.UsageError, TyperException)) and hasattr(exc, "show"):
            exc.show()
            sys.exit(2)
        if isinstance(exc, (click.exceptions.Exit, typer.Exit)):
            sys.exit(exc.exit_code)
        from .io import is_disk_full

        if is_disk_full(exc):  # every write is atomic: what was there before is intact
            err_console.print(f"[bold red]error:[/] no space left on device ({exc}); free space and run the command again",
                              highlight=False)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
