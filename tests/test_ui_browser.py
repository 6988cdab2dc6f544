"""`peftkit ui` in a real browser (Debian's chromium through Selenium), end to end on a tiny model:
fill the New-run form, launch, watch the live curve, stop, resume, finish; then the playground with the base
and the new adapter side by side; evaluate against the base; a screenshot of every page.

Skipped, saying why, where chromium or chromedriver is not installed (`make install` installs them as root).
PEFTKIT_UI_SCREENSHOTS=docs also writes the screenshots there (the README's pictures).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import SUBPROCESS_THREADS
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium / chromedriver on PATH: `apt-get install chromium chromium-driver` (make install does it as root)",
)
STEPS = 150
"""Long enough to stop mid-run (a tiny step takes milliseconds), short enough to finish in seconds."""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


@pytest.fixture
def ui(tmp_path, model_dirs, data_file):
    """`peftkit ui` on a project holding a tiny Llama folder and a jsonl file; yields (url, project, runs)."""
    project, runs = tmp_path / "project", tmp_path / "runs"
    shutil.copytree(model_dirs["llama"], project / "models" / "tiny")
    (project / "data").mkdir()
    shutil.copy(data_file, project / "data" / "train.jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(SUBPROCESS_THREADS)}
    log = open(tmp_path / "ui.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "ui", "--runs", str(runs), "--project", str(project),
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the UI to answer", lambda: process.poll() is None and _answers(url) or process.poll() is not None)
        assert process.poll() is None, (tmp_path / "ui.log").read_text()
        yield url, project, runs
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down; the UI stops its model server
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        for job in runs.glob("*/ui-*.json"):  # a run still going after a failure
            record = json.loads(job.read_text())
            if record.get("exit_code") is None:
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/api/runs", timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    except WebDriverException as exc:  # installed but unusable here (e.g. a driver of another version)
        pytest.skip(f"chromium did not start: {exc.msg}")
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def fill(driver, field_id: str, value: str) -> None:
    box = driver.find_element(By.ID, field_id)
    box.clear()
    box.send_keys(value)


def shoot(driver, name: str, folder: Path) -> Path:
    driver.execute_script("window.scrollTo(0, 0)")
    path = folder / f"ui-{name}.png"
    driver.save_screenshot(str(path))
    assert png_size(path) == (1200, 900) or png_size(path)[0] >= 800, f"{path}: not a page-sized screenshot"
    assert path.stat().st_size > 15_000, f"{path}: looks blank"
    target = os.environ.get("PEFTKIT_UI_SCREENSHOTS")
    if target:  # the README's pictures: 64 colours keep each under ~60 KB
        Image.open(path).convert("RGB").quantize(colors=64).save(Path(target) / path.name, optimize=True)
    return path


def go(driver, page: str) -> None:
    """Another page of the same document (a hash change: the form keeps what was typed)."""
    driver.execute_script("location.hash = arguments[0]", page)


def status(driver) -> str:
    return driver.find_element(By.ID, "run-status").text


def loss_points(driver) -> int:
    return int(driver.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0)


def test_new_run_live_curve_stop_resume_playground_and_report(ui, browser, tmp_path):
    url, project, runs = ui
    shots = tmp_path / "shots"
    shots.mkdir()
    browser.get(url + "/#new")
    wait_for("the generated form", lambda: browser.find_elements(By.ID, "f-lora-r"), 60)

    # -- New run: a tiny LoRA run from the form
    fill(browser, "run-name", "tiny-lora")
    for field, value in {"f-model": "models/tiny", "f-data-dataset": "", "f-data-train": "data/train.jsonl",
                         "f-data-template": "Summarize: {abstract}", "f-data-response": "summary", "f-data-max_length": "128",
                         "f-lora-r": "4", "f-lora-alpha": "8", "f-lora-target_modules": "all-linear", "f-train-batch_size": "2",
                         "f-train-max_steps": str(STEPS), "f-train-lr": "0.005", "f-train-save_every": "0",
                         "f-train-precision": "fp32", "f-generate-num_samples": "0", "f-generate-max_new_tokens": "8"}.items():
        if browser.find_element(By.ID, field).tag_name == "select":
            browser.find_element(By.CSS_SELECTOR, f"#{field} option[value='{value}']").click()
        else:
            fill(browser, field, value)
    assert not browser.find_element(By.CSS_SELECTOR, "fieldset[data-section=lora]").get_attribute("hidden")
    assert browser.find_element(By.CSS_SELECTOR, "fieldset[data-section=quant]").get_attribute("hidden")
    fill(browser, "f-lora-r", "0")  # a mistake first: the CLI's message, the Launch button off
    wait_for("the validation message", lambda: "lora.r: must be at least 1" in browser.find_element(By.ID, "form-error").text, 30)
    assert not browser.find_element(By.ID, "launch").is_enabled()
    assert "fix the form first" in browser.find_element(By.ID, "yaml").text
    fill(browser, "f-lora-r", "4")
    wait_for("the YAML", lambda: "r: 4" in browser.find_element(By.ID, "yaml").text and "max_steps" in browser.find_element(By.ID, "yaml").text, 30)
    assert browser.find_element(By.ID, "launch").is_enabled() and not browser.find_element(By.ID, "form-error").text
    browser.find_element(By.ID, "launch").click()  # the memory estimate arrives meanwhile (checked at the end)

    # -- the run page: live curve, stop (SIGINT: checkpoint), resume, finish
    wait_for("the run page", lambda: browser.current_url.endswith("#run/tiny-lora") or browser.find_element(By.ID, "form-error").text, 30)
    assert browser.current_url.endswith("#run/tiny-lora"), browser.find_element(By.ID, "form-error").text
    wait_for("the live loss curve", lambda: loss_points(browser) >= 3, 240)
    assert status(browser) == "running"
    browser.find_element(By.ID, "stop").click()
    wait_for("the run to stop", lambda: status(browser) == "stopped", 120)
    stopped_at = loss_points(browser)
    assert 3 <= stopped_at < STEPS and list((runs / "tiny-lora" / "checkpoints").glob("step-*"))
    shoot(browser, "run-stopped", shots)
    browser.find_element(By.ID, "resume").click()
    wait_for("the run to finish", lambda: status(browser) == "finished", 240)
    wait_for("every step on the curve", lambda: loss_points(browser) == STEPS, 30)
    assert f"step {STEPS} of {STEPS}" in browser.find_element(By.ID, "run-progress-text").text
    assert (runs / "tiny-lora" / "adapter" / "adapter_model.safetensors").is_file()
    browser.find_element(By.ID, "evaluate").click()
    shoot(browser, "run", shots)

    # -- the playground: base and adapter side by side, both streamed
    go(browser, "playground")
    wait_for("the adapter choice", lambda: browser.find_elements(By.CSS_SELECTOR, "[name=pg-adapter][value=tiny-lora]"), 30)[0].click()
    browser.find_element(By.ID, "pg-load").click()
    wait_for("the model server", lambda: browser.find_element(By.ID, "pg-state").text.startswith("ready")
             or browser.find_element(By.ID, "pg-error").text, 240)
    assert not browser.find_element(By.ID, "pg-error").text
    wait_for("the test examples", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#pg-example option")) > 1, 120)
    browser.find_elements(By.CSS_SELECTOR, "#pg-example option")[1].click()
    assert browser.find_element(By.ID, "pg-prompt").get_attribute("value").startswith("This paper studies problem")
    fill(browser, "pg-max", "8")
    browser.find_element(By.ID, "pg-generate").click()
    answers = wait_for("two answers", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#pg-answers .text.done")) == 2
                       and browser.find_elements(By.CSS_SELECTOR, "#pg-answers .text.done"), 120)
    assert [a.find_element(By.XPATH, "../h3").text for a in answers] == ["base", "tiny-lora"]
    assert all(a.text.strip() for a in answers), [a.text for a in answers]
    assert not browser.find_element(By.ID, "pg-error").text
    shoot(browser, "playground", shots)

    # -- the evaluation started above: its report, browsable from the run and the Reports page
    wait_for("the evaluation report", lambda: (runs / "tiny-lora" / "eval" / "report.html").is_file(), 240)
    go(browser, "run/tiny-lora")
    wait_for("the report in the run page", lambda: browser.find_element(By.ID, "run-report").is_displayed(), 30)
    go(browser, "reports")
    link = wait_for("the report link", lambda: browser.find_elements(By.CSS_SELECTOR, "[data-report='eval/report.html']"), 30)[0]
    link.click()
    wait_for("the report frame", lambda: browser.find_element(By.ID, "report-view").is_displayed(), 30)
    browser.switch_to.frame(browser.find_element(By.ID, "report-view"))
    assert "base" in browser.find_element(By.TAG_NAME, "body").text
    browser.switch_to.default_content()
    shoot(browser, "reports", shots)
    go(browser, "runs")
    row = wait_for("the runs table", lambda: browser.find_elements(By.CSS_SELECTOR, "tr[data-run=tiny-lora]"), 30)[0]
    assert "finished" in row.text and "lora" in row.text and f"{STEPS} / {STEPS}" in row.text
    shoot(browser, "runs", shots)

    # -- back to the form, as filled: its live memory estimate for these settings
    go(browser, "new")
    estimate = wait_for("the memory estimate", lambda: browser.find_elements(By.ID, "estimate-table"), 240)[0]
    assert "trainable parameters" in estimate.text and "total" in estimate.text
    assert browser.find_element(By.ID, "f-model").get_attribute("value") == "models/tiny"
    shoot(browser, "new-run", shots)
