"""The web UI's FastAPI app: one hand-written page (static/) over a small JSON API.

    GET  /                               the page (New run, Runs, Playground, Reports)
    GET  /api/form                       form sections from the config dataclasses, choices
    POST /api/check                      {values, name}: validated config, its YAML, or the CLI's message
    POST /api/estimate                   {values}: `peftkit estimate` (in a child process)
    GET  /api/runs                       every run under --runs, with status
    POST /api/runs                       {values, name}: write runs/NAME/config.yaml, start `peftkit train`
    GET  /api/runs/NAME                  status, progress, new metrics records, log tail, reports
    POST /api/runs/NAME/stop|resume|evaluate
    GET  /files/NAME/PATH                a run's report.html, plots, logs (inside the run only)
    GET  /api/playground                 bases and adapters of finished runs
    POST /api/playground/load            {base, runs}: start the model server, load adapters
    POST /api/playground/complete        {model, prompt, ...}: one streamed answer (text/plain)
    GET  /api/playground/examples?run=   test examples of a run's data

Every POST needs the header `X-Peftkit-UI: 1` (a cross-site form cannot send it), and with
--api-key every request needs the key (the page's login sets a cookie). A user's mistake
comes back as {"error": message} with a 4xx status; a bug is logged and answered with a short 500.

Example:
    >>> app = create_app(UiSettings(roots=Roots(Path("."), Path("runs"))))
    >>> uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import hmac
import json
import logging
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..config import config_from_dict
from ..errors import PeftkitError
from .errors import UiError
from .form import config_yaml, form_sections, form_to_raw, section_owner
from .paths import Roots, data_files, model_folders, path_problems
from .playground import Playground
from .runs import Jobs, list_runs, log_tail, metrics_version, read_config, read_job, read_metrics, reports, run_summary

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "peftkit_ui_key"
FILE_TYPES = {".html": "text/html", ".png": "image/png", ".svg": "image/svg+xml", ".md": "text/plain", ".json": "application/json",
              ".jsonl": "text/plain", ".csv": "text/plain", ".log": "text/plain", ".yaml": "text/plain", ".txt": "text/plain"}
"""What /files serves from a run folder (as these types); weights and checkpoints are not served."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WORKER_TIMEOUT_S = 600
EVAL_LIMIT = 20


@dataclass(frozen=True)
class UiSettings:
    """What `peftkit ui` was started with."""

    roots: Roots
    api_key: str | None = None
    loopback: bool = True
    """Bound to a loopback address: requests must then name a loopback Host (no DNS rebinding)."""


# -- child processes for model-side answers ----------------------------------------------------------
def start_worker(what: str, cwd: Path) -> subprocess.Popen:
    """`python -m peftkit.ui.worker WHAT`, reading its JSON input from a pipe."""
    return subprocess.Popen([sys.executable, "-m", "peftkit.ui.worker", what], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def worker_answer(child: subprocess.Popen, what: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's JSON answer to `payload`; None when it was stopped by a signal (a newer request replaced it)."""
    try:
        out, err = child.communicate(json.dumps(payload), timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        raise UiError(f"{what} took longer than {WORKER_TIMEOUT_S} s; try again when the machine is less busy", status=504) from None
    if child.returncode < 0:
        return None
    if child.returncode != 0:
        log.error("peftkit.ui.worker %s failed:\n%s", what, err)
        raise UiError(f"{what} failed unexpectedly (details in the UI's log)", status=500)
    return json.loads(out)


def run_worker(what: str, payload: dict[str, Any], cwd: Path) -> dict[str, Any]:
    answer = worker_answer(start_worker(what, cwd), what, payload)
    if answer is None:
        raise UiError(f"{what} was interrupted; try again", status=503)
    return answer


class Estimator:
    """`peftkit estimate` for the latest settings only: a newer request stops the child still estimating older
    ones (on a shared CPU, stale estimates would slow the current one down). Answers are cached."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.lock = threading.Lock()
        self.current: subprocess.Popen | None = None
        self.cache: dict[str, dict[str, Any]] = {}

    def estimate(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """The worker's answer, or None when a newer request replaced this one."""
        key = json.dumps(raw, sort_keys=True)
        if key in self.cache:
            return self.cache[key]
        with self.lock:
            if self.current is not None and self.current.poll() is None:
                self.current.terminate()
            child = self.current = start_worker("estimate", self.cwd)
        answer = worker_answer(child, "estimate", raw)
        if answer is not None:
            self.cache[key] = answer
        return answer

    def close(self) -> None:
        if self.current is not None and self.current.poll() is None:
            self.current.kill()


class Catalog:
    """Built-in models and datasets, asked once from a worker in the background."""

    def __init__(self, cwd: Path) -> None:
        self.answer: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._load, args=(cwd,), daemon=True)

    def _load(self, cwd: Path) -> None:
        try:
            self.answer = run_worker("catalog", {}, cwd)
        except (UiError, ValueError, OSError):
            log.exception("could not list the built-in models and datasets")
            self.answer = {"models": [], "datasets": []}


# -- the app -------------------------------------------------------------------------------------------
@dataclass
class UiState:
    """What the routes share: where runs live, their jobs, the model server, the workers' answers."""

    settings: UiSettings
    jobs: Jobs
    playground: Playground
    catalog: Catalog
    estimator: Estimator

    @property
    def roots(self) -> Roots:
        return self.settings.roots


def create_app(settings: UiSettings) -> FastAPI:
    """The UI app for `settings` (runs folder, project, access)."""
    roots = settings.roots
    state = UiState(settings, Jobs(roots), Playground(roots), Catalog(roots.project), Estimator(roots.project))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.catalog.thread.start()
        try:
            yield
        finally:  # runs keep going: they are not the UI's to stop
            state.playground.close()
            state.estimator.close()

    app = FastAPI(title="peftkit ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_guards(app, settings)
    _add_page_routes(app, settings)
    _add_form_routes(app, state)
    _add_run_routes(app, state)
    _add_playground_routes(app, state)
    return app


def _add_page_routes(app: FastAPI, settings: UiSettings) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=_page_headers())

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in ("app.js", "style.css"):
            raise UiError(f"no static file {name!r}", status=404)
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    @app.get("/login", include_in_schema=False)
    async def login_page() -> Response:
        return HTMLResponse(LOGIN_PAGE)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        given = parse_qs((await request.body()).decode(errors="replace")).get("key", [""])[0]
        if settings.api_key is None or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            return HTMLResponse(LOGIN_PAGE.replace("<!--msg-->", "<p class=error>wrong key</p>"), status_code=401)
        response = Response(status_code=303, headers={"Location": "/"})
        response.set_cookie(COOKIE, settings.api_key, httponly=True, samesite="strict")
        return response


def checked_config(body: dict[str, Any], roots: Roots, name_needed: bool) -> tuple[dict[str, Any], str | None]:
    """The config dict of a form, validated like the CLI's and with its paths confined, and the run name."""
    values = body.get("values")
    if not isinstance(values, dict):
        raise UiError("the request needs `values`: an object of config keys")
    raw = form_to_raw(values)
    name = body.get("name")
    if name_needed or name:
        raw["output_dir"] = str(roots.run_dir(name))
    config_from_dict(raw, source="form")
    problems = path_problems(raw, roots)
    if problems:
        raise UiError("form: " + "; ".join(problems))
    return raw, name


def _add_form_routes(app: FastAPI, state: UiState) -> None:
    roots = state.roots

    @app.get("/api/form")
    async def form() -> dict[str, Any]:
        sections = []
        for section in form_sections():
            owner = section_owner(section.name)
            sections.append({**asdict(section), "owner": owner and {"by": owner[0], "values": list(owner[1])}})
        runs = await run_in_threadpool(list_runs, roots, state.jobs)
        return {"sections": sections, "catalog": state.catalog.answer, "data_files": await run_in_threadpool(data_files, roots),
                "model_folders": await run_in_threadpool(model_folders, roots),
                "adapters": [str(roots.runs / r["name"] / "adapter") for r in runs if r["adapter"]], "runs_dir": str(roots.runs)}

    @app.get("/api/catalog")
    async def catalog() -> dict[str, Any]:
        return {"catalog": state.catalog.answer}

    @app.post("/api/check")
    async def check(request: Request) -> dict[str, Any]:
        try:
            raw, name = checked_config(await _json_body(request), roots, name_needed=False)
        except PeftkitError as exc:
            return {"ok": False, "error": str(exc)}
        target = roots.run_dir(name) / "config.yaml" if name else "config.yaml"
        return {"ok": True, "yaml": config_yaml(raw), "command": f"peftkit train {target}"}

    @app.post("/api/estimate")
    async def estimate(request: Request) -> dict[str, Any]:
        try:
            raw, _ = checked_config(await _json_body(request), roots, name_needed=False)
        except PeftkitError as exc:
            return {"ok": False, "error": str(exc)}
        raw.pop("output_dir", None)
        answer = await run_in_threadpool(state.estimator.estimate, raw)
        if answer is None:
            return {"ok": False, "superseded": True, "error": "replaced by a newer estimate"}
        return {"ok": False, "error": answer["error"]} if "error" in answer else {"ok": True, "estimate": answer}

    @app.post("/api/runs")
    async def create_run(request: Request) -> dict[str, Any]:
        raw, name = checked_config(await _json_body(request), roots, name_needed=True)
        folder = roots.run_dir(str(name))
        if folder.exists() and any(folder.iterdir()):
            raise UiError(f"run {name!r} exists already under {roots.runs}; choose another name", status=409)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(config_yaml(raw), encoding="utf-8")
        state.jobs.start(folder, "train", [str(folder / "config.yaml")])
        return {"name": name}


def run_detail(folder: Path, jobs: Jobs, since: int, version: int) -> dict[str, Any]:
    """A run page's poll: summary, the metrics records it lacks (all of them after a rewrite), logs, reports."""
    records = read_metrics(folder)
    current = metrics_version(folder)
    reset = current != version or since > len(records)
    eval_job = read_job(folder, "eval")
    return {
        "summary": run_summary(folder, jobs), "version": current, "reset": reset,
        "records": records if reset else records[since:], "count": len(records),
        "log": log_tail(folder, "train", 12), "reports": reports(folder),
        "eval": {"running": jobs.running(folder, "eval"), "exit_code": eval_job.get("exit_code") if eval_job else None,
                 "started": bool(eval_job), "log": log_tail(folder, "eval", 6)},
        "config": yaml.safe_dump(read_config(folder), sort_keys=False),
        "command": f"peftkit train {folder / 'config.yaml'} --resume",
    }


def _add_run_routes(app: FastAPI, state: UiState) -> None:
    roots, jobs = state.roots, state.jobs

    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        return {"runs": await run_in_threadpool(list_runs, roots, jobs)}

    @app.get("/api/runs/{name}")
    async def run(name: str, since: int = 0, version: int = 0) -> dict[str, Any]:
        return await run_in_threadpool(run_detail, roots.existing_run(name), jobs, since, version)

    @app.post("/api/runs/{name}/stop")
    async def stop(name: str) -> dict[str, Any]:
        jobs.stop(roots.existing_run(name))
        return {"stopping": name}

    @app.post("/api/runs/{name}/resume")
    async def resume(name: str) -> dict[str, Any]:
        folder = roots.existing_run(name)
        status = run_summary(folder, jobs)["status"]
        if status not in ("stopped", "failed") or not (folder / "checkpoints").is_dir():
            raise UiError(f"run {name!r} is {status} with no checkpoint to resume from; only a stopped run resumes", status=409)
        jobs.start(folder, "train", [str(folder / "config.yaml"), "--resume"])
        return {"resumed": name}

    @app.post("/api/runs/{name}/evaluate")
    async def evaluate(name: str) -> dict[str, Any]:
        folder = roots.existing_run(name)
        summary = run_summary(folder, jobs)
        if not summary["adapter"] or summary["task"] != "generation":
            raise UiError(f"run {name!r} has no finished generation adapter to evaluate yet", status=409)
        jobs.start(folder, "eval", ["--adapter", str(folder / "adapter"), "--out", str(folder / "eval"), "--limit", str(EVAL_LIMIT)])
        return {"evaluating": name}

    @app.get("/files/{name}/{path:path}")
    async def run_file(name: str, path: str) -> Response:
        folder = roots.existing_run(name).resolve()
        target = (folder / path).resolve()
        if ".." in Path(path).parts or not target.is_relative_to(folder) or not target.is_file() or target.suffix not in FILE_TYPES:
            raise UiError(f"{path!r}: no such report, plot or log in run {name!r}", status=404)
        # a report is shown in a sandbox: no scripts, no access to the UI's cookie or API
        return FileResponse(target, media_type=FILE_TYPES[target.suffix], headers={"Content-Security-Policy": "sandbox"})


def playground_runs(roots: Roots, base: Any, names: Any) -> list[str]:
    """The picked runs, each with a finished adapter trained on `base` (nothing else can be loaded)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UiError("`runs` must be a list of run names")
    for name in names:
        config = read_config(roots.existing_run(name))
        if not (roots.run_dir(name) / "adapter").is_dir() or config.get("model") != base:
            raise UiError(f"run {name!r} has no finished adapter trained on {base!r}")
    return names


def _add_playground_routes(app: FastAPI, state: UiState) -> None:
    roots, playground = state.roots, state.playground

    @app.get("/api/playground")
    async def choices() -> dict[str, Any]:
        rows = [r for r in await run_in_threadpool(list_runs, roots, state.jobs)
                if r["adapter"] and r["task"] == "generation" and r["method"] != "full" and r["status"] != "running"]
        return {"bases": sorted({str(r["model"]) for r in rows}),
                "adapters": [{"run": r["name"], "base": str(r["model"]), "method": r["method"]} for r in rows]}

    @app.post("/api/playground/load")
    async def load(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        base = body.get("base")
        if base not in {str(read_config(p).get("model")) for p in roots.runs.iterdir() if p.is_dir()}:
            raise UiError(f"base {base!r} is not the base of any run under {roots.runs}")
        names = await run_in_threadpool(playground.prepare, base, playground_runs(roots, base, body.get("runs", [])))
        return {"base": "base", "adapters": names}

    @app.post("/api/playground/complete")
    async def complete(request: Request) -> Response:
        body = await _json_body(request)
        prompt, model = body.get("prompt"), body.get("model")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UiError("type a prompt (or pick a test example) first")
        if not isinstance(model, str):
            raise UiError("`model` must be the name of a loaded model")
        pieces = await run_in_threadpool(playground.stream, model, prompt, *_decoding(body))
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/api/playground/examples")
    async def examples(run: str) -> dict[str, Any]:
        config = read_config(roots.existing_run(run))
        config.pop("output_dir", None)
        answer = await run_in_threadpool(run_worker, "examples", config, roots.project)
        if "error" in answer:
            raise UiError(answer["error"])
        return answer


def _decoding(body: dict[str, Any]) -> tuple[int, float, float]:
    """max_tokens, temperature, top_p from a request, range-checked with readable messages."""
    try:
        max_tokens = int(body.get("max_tokens", 60))
        temperature = float(body.get("temperature", 0.0))
        top_p = float(body.get("top_p", 1.0))
    except (TypeError, ValueError):
        raise UiError("max tokens, temperature and top-p must be numbers") from None
    if not 1 <= max_tokens <= 512:
        raise UiError(f"max tokens {max_tokens}: must be between 1 and 512")
    if not 0 <= temperature <= 2:
        raise UiError(f"temperature {temperature}: must be between 0 (greedy) and 2")
    if not 0 < top_p <= 1:
        raise UiError(f"top-p {top_p}: must be in (0, 1]")
    return max_tokens, temperature, top_p


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise UiError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise UiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _page_headers() -> dict[str, str]:
    """The page loads nothing from elsewhere: scripts, styles and requests stay on this origin."""
    return {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-src 'self'; object-src 'none'",
            "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def _install_guards(app: FastAPI, settings: UiSettings) -> None:
    """Host check (loopback binds), API key, the POST header; errors as readable JSON."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = _host_name(request.headers.get("host", ""))
        if settings.loopback and host not in LOOPBACK_HOSTS:
            return JSONResponse({"error": f"Host {host!r} refused: this UI answers on 127.0.0.1 / localhost only"}, status_code=421)
        open_path = request.url.path == "/login" or request.url.path == "/static/style.css"
        if settings.api_key is not None and not open_path and not _has_key(request, settings.api_key):
            if request.method == "GET" and not request.url.path.startswith(("/api/", "/files/")):
                return Response(status_code=303, headers={"Location": "/login"})
            return JSONResponse({"error": "missing or wrong key: log in at /login"}, status_code=401)
        if request.method == "POST" and request.url.path != "/login" and request.headers.get("x-peftkit-ui") != "1":
            return JSONResponse({"error": "POST requests need the header X-Peftkit-UI: 1 (the page sends it)"}, status_code=403)
        return await call_next(request)

    @app.exception_handler(PeftkitError)
    async def user_mistake(_: Request, exc: PeftkitError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        log.error("UI request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error (details in the UI's log)"}, status_code=500)


def _host_name(header: str) -> str:
    """`127.0.0.1:7860` -> `127.0.0.1`; `[::1]:7860` -> `[::1]`."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.partition(":")[0]


def _has_key(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
        return True
    return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), key.encode())


LOGIN_PAGE = """<!doctype html><meta charset=utf-8><title>peftkit ui: log in</title>
<link rel=stylesheet href=/static/style.css><main class=login><h1>peftkit ui</h1><!--msg-->
<form method=post action=/login><label>API key <input type=password name=key autofocus></label> <button>Log in</button></form></main>"""
