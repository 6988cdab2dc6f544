"""The playground's model server: a `peftkit serve` child process, spoken to over its OpenAI API.

Model code never runs in the UI's process. The server starts on demand for the chosen base,
with the runs folder as its adapter root and a random admin key; adapters are loaded into it when
first picked (POST /admin/adapters). Choosing another base restarts it. Answers stream from
/v1/completions, which formats each adapter's prompt with the template recorded at training.

Example:
    >>> playground = Playground(roots)
    >>> names = playground.prepare("runs/tiny-base", ["r8"])     # {"r8": "r8"}
    >>> for text in playground.stream("r8", "We study ...", max_tokens=40): ...
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import UiError
from .paths import Roots

START_TIMEOUT_S = 600.0
"""Loading a base on a busy CPU can take minutes; the page shows a spinner meanwhile."""


def adapter_alias(run: str) -> str:
    """The name a run's adapter is served under (an identifier: the server's rule)."""
    return "run_" + "".join(c if c.isalnum() else "_" for c in run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """One `peftkit serve --model BASE --adapter-root RUNS` child on a free loopback port."""

    def __init__(self, base: str, roots: Roots, log_path: Path) -> None:
        self.base = base
        self.port = free_port()
        self.key = secrets.token_urlsafe(24)
        self.loaded: set[str] = set()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "peftkit.cli", "serve", "--model", base, "--served-model-name", "base",
                 "--adapter-root", str(roots.runs), "--port", str(self.port), "--max-wait-ms", "5"],
                cwd=roots.project, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PEFTKIT_API_KEY": self.key},
            )

    def request(self, method: str, path: str, body: Any = None, timeout: float = 600.0) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        return conn.getresponse()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UiError(f"the model server for {self.base!r} stopped while loading: {self.log_tail()}")
            try:
                if self.request("GET", "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise UiError(f"the model server for {self.base!r} did not start within {START_TIMEOUT_S:.0f} s", status=504)

    def load(self, run: str) -> str:
        name = adapter_alias(run)
        if name not in self.loaded:
            response = self.request("POST", "/admin/adapters", {"name": name, "path": f"{run}/adapter"})
            if response.status != 201:
                raise UiError(f"adapter of run {run!r}: {error_message(response)}", status=response.status)
            self.loaded.add(name)
        return name

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " ".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def error_message(response: http.client.HTTPResponse) -> str:
    """The OpenAI-style error's message (or the raw body's start)."""
    raw = response.read()
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode(errors="replace")


class Playground:
    """Owns at most one model server; thread-safe (answers stream from several requests at once)."""

    def __init__(self, roots: Roots) -> None:
        self.roots = roots
        self.server: ServeProcess | None = None
        self.lock = threading.Lock()

    def prepare(self, base: str, runs: list[str]) -> dict[str, str]:
        """Start (or reuse) the server for `base` and load the runs' adapters; {run: served name}."""
        with self.lock:
            if self.server is None or self.server.base != base or self.server.process.poll() is not None:
                self.close()
                self.server = ServeProcess(base, self.roots, self.roots.runs / ".ui" / "serve.log")
                self.server.wait_ready()
            return {run: self.server.load(run) for run in runs}

    def stream(self, model: str, prompt: str, max_tokens: int, temperature: float, top_p: float) -> Iterator[str]:
        """Text pieces of one answer as the server produces them."""
        server = self.server
        if server is None or server.process.poll() is not None:
            raise UiError("no model is loaded; press Load first", status=409)
        response = server.request("POST", "/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "stream": True,
        })
        if response.status != 200:
            raise UiError(error_message(response), status=response.status if 400 <= response.status < 500 else 502)
        return _sse_texts(response)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def _sse_texts(response: http.client.HTTPResponse) -> Iterator[str]:
    for line in response:
        text = line.decode("utf-8", errors="replace").strip()
        if not text.startswith("data:") or text == "data: [DONE]":
            continue
        chunk = json.loads(text[5:])
        if "error" in chunk:
            yield f"\n[error: {chunk['error'].get('message', chunk['error'])}]"
            return
        for choice in chunk.get("choices", []):
            if choice.get("text"):
                yield choice["text"]
