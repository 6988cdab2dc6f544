"""A real uvicorn on 127.0.0.1 (random free port), called by the real `openai` client; a bounded load test."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from peftkit.serve import Engine, ServeSettings, create_app
from serving_helpers import PROMPTS, save_all, single_thread  # noqa: F401 (autouse fixture)

KEY = "http-test-key"
MODELS = ["tiny", "outcome", "challenge"]


@pytest.fixture(scope="module")
def url(model_dirs, tokenizer, tmp_path_factory):
    """The base URL of a real uvicorn serving the tiny base and two adapters in this process."""
    root = tmp_path_factory.mktemp("root")
    folders = save_all(root, len(tokenizer))
    settings = ServeSettings(api_key=KEY, adapter_root=root, max_batch_size=8, max_wait_ms=5, max_concurrent=64)
    engine = Engine.from_paths(
        str(model_dirs["llama"]), {n: folders[n] for n in MODELS[1:]}, settings, device="cpu", base_name="tiny"
    )
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for startup (10 s)
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_lists_models_and_completes(client):
    assert [m.id for m in client.models.list()] == MODELS
    texts = {}
    for model in MODELS:
        completion = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert completion.usage.completion_tokens >= 1
        texts[model] = completion.choices[0].text
    assert len(set(texts.values())) == 3
    streamed = client.completions.create(model="outcome", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == texts["outcome"]


def test_openai_client_chat_streaming(client):
    messages = [{"role": "user", "content": "What did the paper find?"}]
    whole = client.chat.completions.create(model="challenge", messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="challenge", messages=messages, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_client_sees_typed_errors(client, url):
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="ghost", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_concurrent_requests_for_different_adapters_share_batches(client, url):
    jobs = [(MODELS[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    alone = [client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text for m, p in jobs]
    before = httpx.get(f"{url}/health").json()

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60) as aclient:
            calls = [aclient.completions.create(model=m, prompt=p, max_tokens=8, temperature=0) for m, p in jobs]
            return [r.choices[0].text for r in await asyncio.gather(*calls)]

    assert asyncio.run(together()) == alone
    after = httpx.get(f"{url}/health").json()
    assert after["mixed_steps"] > before["mixed_steps"]
    assert after["steps"] - before["steps"] < 8 * len(jobs), "concurrent requests must share decode steps"


def test_admin_load_over_http(client, url):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/admin/adapters", json={"name": "approach", "path": "approach"}, headers=headers)
    assert r.status_code == 201, r.text
    assert client.completions.create(model="approach", prompt="We", max_tokens=3, temperature=0).choices
    assert httpx.delete(f"{url}/admin/adapters/approach", headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="approach", prompt="We", max_tokens=3)


def test_load_1000_requests_16_at_a_time_without_errors(url):
    async def load() -> tuple[int, list[BaseException]]:
        gate = asyncio.Semaphore(16)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60) as aclient:
            async def one(i: int) -> int:
                async with gate:
                    r = await aclient.completions.create(model=MODELS[i % 3], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=3, temperature=0)
                    return len(r.choices)
            results = await asyncio.gather(*(one(i) for i in range(1000)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        return sum(r for r in results if isinstance(r, int)), errors

    answered, errors = asyncio.run(load())
    assert errors == [] and answered == 1000


def rss_bytes() -> int:
    """Resident memory of this process (the server runs in it, on a thread)."""
    pages = int(open("/proc/self/statm").read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def mixed_load(url: str, requests: int, concurrency: int = 16) -> dict[str, int]:
    """Mixed adapters and endpoints; every 4th request streams and every 8th hangs up after its first chunk."""
    headers = {"Authorization": f"Bearer {KEY}"}
    counts = {"whole": 0, "streamed": 0, "disconnected": 0}
    gate = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        model, prompt = MODELS[i % 3], PROMPTS[i % len(PROMPTS)]
        chat = i % 5 == 0
        body = {"model": model, "max_tokens": 4, "temperature": 0 if i % 2 else 0.8, "seed": i,
                **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with gate:
            if i % 4:
                r = await http.post(path, json=body, headers=headers)
                assert r.status_code == 200, r.text
                assert r.json()["choices"], r.text
                counts["whole"] += 1
                return
            async with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
                assert r.status_code == 200
                lines = []
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                    if i % 8 == 0 and lines:  # the client goes away mid-stream
                        counts["disconnected"] += 1
                        return
                assert lines[-1] == "data: [DONE]" and "error" not in "".join(lines)
                counts["streamed"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(one(http, i) for i in range(requests)))
    return counts


def test_mixed_load_with_disconnects_keeps_memory_flat(url):
    asyncio.run(mixed_load(url, 96))  # warm-up: allocator pools, tokenizer caches, stacked adapter weights
    gc.collect()
    warm = rss_bytes()
    counts = asyncio.run(mixed_load(url, 480))
    gc.collect()
    grown = rss_bytes() - warm
    print(f"load: {sum(counts.values())} requests {counts}, RSS {warm / 2**20:.0f} MiB -> {(warm + grown) / 2**20:.0f} MiB")
    assert sum(counts.values()) == 480 and counts["disconnected"] == 60
    assert grown < max(0.15 * warm, 64 * 2**20), f"RSS grew {grown / 2**20:.0f} MiB under a bounded load"
    for _ in range(100):  # cancelled streams leave the queue (bounded wait: 5 s)
        if httpx.get(f"{url}/health").json()["queued"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(f"{url}/health").json()["queued"] == 0
    counts = asyncio.run(mixed_load(url, 64, concurrency=64))  # == max_concurrent: a leaked slot would answer 429
    assert sum(counts.values()) == 64


def test_an_abandoned_request_is_cancelled_and_does_not_hold_up_the_next(url):
    """A client that times out on a long non-streaming request: its sequence leaves the batch within a step."""
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": "outcome", "prompt": [5, 6, 7], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    before = httpx.get(f"{url}/health").json()
    for _ in range(2):  # two abandoned 480-token requests, as in the issue
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=long, headers=headers, timeout=0.3)
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 4}, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    for _ in range(100):  # bounded: 5 s
        health = httpx.get(f"{url}/health").json()
        if health["cancelled"] - before["cancelled"] == 2 and health["running"] == 0:
            break
        time.sleep(0.05)
    assert health["cancelled"] - before["cancelled"] == 2 and health["running"] == 0, health
    steps = health["steps"] - before["steps"]
    assert steps < 480, f"the abandoned requests kept decoding ({steps} steps for {time.monotonic() - started:.1f} s)"


def test_sigterm_drains_then_exits_within_a_bounded_time(model_dirs, tmp_path):
    """`peftkit serve` busy with long requests (one streaming, one not) exits soon after SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (
        "from peftkit.serve.server import run_server; from peftkit.serve import ServeSettings; "
        f"run_server({str(model_dirs['llama'])!r}, {{}}, ServeSettings(drain_seconds=1, max_tokens_limit=500), port={port}, device='cpu')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded wait for startup (60 s)
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        assert name == model_dirs["llama"].name, "a local folder is served under its folder name"
        body = {"model": name, "prompt": "We", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
        clients = [threading.Thread(target=_swallow, args=(f"{base}/v1/completions", {**body, "stream": stream}), daemon=True)
                   for stream in (False, True)]
        for client in clients:
            client.start()
        for _ in range(100):
            if httpx.get(f"{base}/health", timeout=5).json()["running"] >= 1:
                break
            time.sleep(0.05)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        stopped = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    print(f"SIGTERM to exit: {stopped:.1f} s")
    assert stopped < 10, f"{stopped:.1f} s from SIGTERM to exit (drain 1 s)"
    assert server.returncode in (0, -signal.SIGTERM), server.stderr.read()[-2000:]  # uvicorn re-raises the signal


def _swallow(url: str, body: dict) -> None:
    """Send a request and ignore how it ends (the server is being stopped)."""
    try:
        httpx.post(url, json=body, timeout=60)
    except httpx.HTTPError:
        pass
