"""lm-evaluation-harness tasks from aclsum, to score a `peftkit serve` endpoint, and the same questions for
`peftkit eval --mc`, so both numbers can be compared.

- `aclsum_outcome_mc` (multiple_choice): "which outcome does this abstract report?" with the paper's own
  outcome summary and three other papers' as distractors. The context is formatted exactly as
  `peftkit eval --mc` formats a question (its `Question: ...\\nAnswer:` template, through the model's
  chat template), so lm-eval's `acc` equals `peftkit eval --mc`'s accuracy on `mc.jsonl`.
- `aclsum_outcome_gen` (generate_until): the abstract, then "Outcome:"; one line, scored with BLEU.

Example:
    $ python -m peftkit.serve.lm_eval_tasks --model smollm2-135m --out tasks/aclsum --limit 20
    $ lm_eval --model local-completions --include_path tasks/aclsum --tasks aclsum_outcome_mc,aclsum_outcome_gen \\
          --model_args model=outcome,base_url=http://127.0.0.1:8000/v1/completions
    $ peftkit eval --adapter runs/outcome/adapter --mc tasks/aclsum/mc.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from ..data.sources import aclsum_rows
from ..data.templates import format_prompt, response_text
from ..eval.multiple_choice import MC_FORMAT, McQuestion
from ..models import load_tokenizer, resolve_model_path

QUESTION = "Which outcome does this abstract report?\n\n{abstract}"
GEN_PROMPT = "Abstract: {abstract}\nOutcome:"
DISTRACTORS = 3


def mc_questions(rows: Sequence[dict[str, Any]], abstract_chars: int, summary_chars: int) -> list[McQuestion]:
    """One question per paper: its outcome summary among the next papers' (the answer's place rotates)."""
    questions = []
    for i, row in enumerate(rows):
        others = [rows[(i + k) % len(rows)]["summary"] for k in range(1, DISTRACTORS + 1)]
        answer = i % (DISTRACTORS + 1)
        choices = [s[:summary_chars].strip() for s in others[:answer] + [row["summary"]] + others[answer:]]
        questions.append(McQuestion(QUESTION.format(abstract=row["abstract"][:abstract_chars].strip()), choices, answer))
    return questions


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
            f"test_split: test\n{body}")


def write_tasks(tokenizer: Any, rows: Sequence[dict[str, Any]], out: Path, abstract_chars: int = 600,
                summary_chars: int = 200) -> dict[str, Path]:
    """The task folder: two lm-eval YAMLs, their data, and `mc.jsonl` (MMLU layout) for `peftkit eval --mc`."""
    out.mkdir(parents=True, exist_ok=True)
    questions = mc_questions(rows, abstract_chars, summary_chars)
    mc = write_jsonl(out / "mc.jsonl", [{"question": q.question, "choices": q.choices, "answer": q.answer} for q in questions])
    contexts = []
    for q in questions:  # what peftkit eval --mc scores: the formatted question, then each formatted option
        context = format_prompt(tokenizer, MC_FORMAT, {"question": q.question})
        contexts.append({"context": context, "choices": [response_text(tokenizer, MC_FORMAT, context, c) for c in q.choices],
                         "answer": q.answer})
    mc_data = write_jsonl(out / "aclsum_outcome_mc.jsonl", contexts)
    gen_data = write_jsonl(out / "aclsum_outcome_gen.jsonl", [
        {"prompt": GEN_PROMPT.format(abstract=r["abstract"][:abstract_chars].strip()), "summary": r["summary"]} for r in rows])
    (out / "aclsum_outcome_mc.yaml").write_text(task_yaml("aclsum_outcome_mc", mc_data, (
        "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')))
    (out / "aclsum_outcome_gen.yaml").write_text(task_yaml("aclsum_outcome_gen", gen_data, (
        "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: summary\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 32\n  do_sample: false\n  temperature: 0\n'
        "metric_list:\n  - metric: bleu\n")))
    return {"mc": mc, "folder": out}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write lm-evaluation-harness tasks from aclsum/outcome for a served model.")
    parser.add_argument("--model", default="smollm2-135m", help="The served base (its tokenizer formats the questions).")
    parser.add_argument("--out", type=Path, default=Path("tasks/aclsum"))
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--limit", type=int, default=20, help="Papers (questions) to use.")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    write_tasks(tokenizer, aclsum_rows(args.split, "outcome")[: args.limit], args.out)


if __name__ == "__main__":
    main()
