"""An Ollama `Modelfile` beside an exported GGUF: FROM, TEMPLATE, PARAMETER stop.

Ollama's TEMPLATE is a Go template, not Jinja. Chat templates of the exported families wrap each
message in text that depends only on its role (ChatML: `<|im_start|>user\\n ... <|im_end|>\\n`),
sometimes after a default system preamble. So the Jinja template is rendered on marker messages
to read those pieces off, the Go template is assembled from them, and the pieces are checked by
rebuilding whole conversations and comparing them with the Jinja rendering; a template that does
more (content-dependent logic) is refused rather than converted wrongly.

Example:
    >>> write_modelfile("out/model.gguf", tokenizer)   # writes out/Modelfile
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..io import atomic_write_text

MARK = "PEFTKIT-CONTENT-MARK"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatPieces:
    """The text a chat template puts around messages."""

    preamble: str
    """Written first when the conversation has no system message (a default system prompt), else ''."""
    wrap: dict[str, tuple[str, str]]
    """role -> (text before the content, text after it)."""
    generation_prompt: str
    """What `add_generation_prompt` appends to open the assistant's turn."""

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as these pieces write it, with the generation prompt (the check's other side)."""
        head = "" if messages and messages[0]["role"] == "system" else self.preamble
        body = "".join(self.wrap[m["role"]][0] + m["content"] + self.wrap[m["role"]][1] for m in messages)
        return head + body + self.generation_prompt


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _around(text: str) -> tuple[str, str]:
    before, found, after = text.partition(MARK)
    if not found:
        raise ExportError("the chat template does not write message contents verbatim; write the Modelfile's TEMPLATE by hand")
    return before, after


def _remove_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ExportError("the chat template's output for a conversation does not extend its output for the conversation's "
                          "start; write the Modelfile's TEMPLATE by hand")
    return text[len(prefix):]


def chat_pieces(tokenizer: Any) -> ChatPieces:
    """Read the pieces off the tokenizer's chat template and check them on two conversations."""
    first_user = [{"role": "user", "content": "Hello"}]
    system = [{"role": "system", "content": "Be brief."}]
    wrap = {"system": _around(_render(tokenizer, [{"role": "system", "content": MARK}]))}
    for role in ("user", "assistant"):
        lead = system if role == "user" else system + first_user
        wrap[role] = _around(_remove_prefix(_render(tokenizer, lead + [{"role": role, "content": MARK}]), _render(tokenizer, lead)))
    user_alone = _around(_render(tokenizer, [{"role": "user", "content": MARK}]))[0]
    if not user_alone.endswith(wrap["user"][0]):
        raise ExportError("the chat template writes a first user message differently from later ones; write the "
                          "Modelfile's TEMPLATE by hand")
    preamble = user_alone[: len(user_alone) - len(wrap["user"][0])]
    generation = _remove_prefix(_render(tokenizer, first_user, True), _render(tokenizer, first_user))
    pieces = ChatPieces(preamble, wrap, generation)
    for conversation in (system + first_user + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Why?"}],
                         first_user + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Why?"}]):
        if pieces.render(conversation) != _render(tokenizer, conversation, True):
            raise ExportError("the chat template is not a fixed wrapping per role (it depends on the content or position); "
                              "write the Modelfile's TEMPLATE by hand")
    return pieces


def _literal(text: str) -> str:
    """Text inside a Go template (actions start with `{{`, which plain text must not contain)."""
    if "{{" in text or "}}" in text:
        raise ExportError(f"the chat template writes {text!r}, which contains Go template braces; write TEMPLATE by hand")
    return text


def go_template(pieces: ChatPieces) -> str:
    """Ollama's TEMPLATE over `.Messages` (no `{{-` trimming: the literal pieces keep their newlines)."""
    preamble = _literal(pieces.preamble)
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_literal(before)}{{{{ .Content }}}}{_literal(after)}'
        for i, (role, (before, after)) in enumerate(pieces.wrap.items())
    )
    head = (f'{{{{ if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{preamble}{{{{ end }}}}'
            f"{{{{ else }}}}{preamble}{{{{ end }}}}") if preamble else ""
    return f"{head}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_literal(pieces.generation_prompt)}"


def stop_strings(tokenizer: Any, pieces: ChatPieces | None) -> list[str]:
    """Where generation must stop: EOS, the end of an assistant turn, the start of a user turn."""
    candidates = [tokenizer.eos_token]
    if pieces is not None:
        candidates += [pieces.wrap["assistant"][1].strip(), pieces.wrap["user"][0].strip()]
    return list(dict.fromkeys(c for c in candidates if c))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, tokenizer: Any) -> str:
    """The Modelfile: the chat template converted when there is one, plain completion otherwise."""
    pieces = chat_pieces(tokenizer) if tokenizer.chat_template else None
    template = go_template(pieces) if pieces else "{{ .Prompt }}"
    if '"""' in template:
        raise ExportError('the chat template writes """, which would end the Modelfile\'s TEMPLATE; write it by hand')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stop_strings(tokenizer, pieces)]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer: Any) -> Path:
    """Write `Modelfile` beside the GGUF file (atomically); `ollama create NAME -f <it>` reads it."""
    gguf_path = Path(gguf_path)
    path = gguf_path.with_name("Modelfile")
    atomic_write_text(path, modelfile_text(gguf_path.name, tokenizer))
    return path
