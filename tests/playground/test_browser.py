"""Notebook 07 in a real browser: JupyterLab 4 + Debian's chromium driven by Python Playwright.

Skipped only when /usr/bin/chromium is missing and QWENLAB_REQUIRE_BROWSER is unset (CI sets it, after
scripts/browser_setup.sh installed chromium). Screenshots land in reports/browser/.
"""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qwenlab.paths import REPO_ROOT

REPO = REPO_ROOT
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "notebooks/07_prompt_playground.ipynb"
SHOTS = REPO / "reports" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# JupyterLab settings for the run: no autosave (running cells must not write outputs into the committed notebook),
# every cell rendered (windowing off), no news/update toasts over the page.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}
SERVER_START_S, KERNEL_START_S, RUN_ALL_S, GENERATE_S = 90, 120, 300, 120


def require_browser():
    if CHROMIUM.exists():
        return
    if os.environ.get("QWENLAB_REQUIRE_BROWSER"):
        pytest.fail(f"QWENLAB_REQUIRE_BROWSER is set but {CHROMIUM} is missing: run scripts/browser_setup.sh")
    pytest.skip(f"{CHROMIUM} not installed (scripts/browser_setup.sh installs it; "
                "set QWENLAB_REQUIRE_BROWSER=1 to make this a failure)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        return json.loads(body) if body else None


def start_lab(tmp: Path):
    settings, workspaces = tmp / "lab-settings", tmp / "lab-workspaces"
    for rel, value in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    workspaces.mkdir()
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(workspaces),
           "HF_HUB_OFFLINE": "1",
           # doc/playground.md: outside a venv a per-user `qwenlab` kernelspec would win over this environment's
           "JUPYTER_PREFER_ENV_PATH": "1"}
    env.pop("MPLBACKEND", None)
    log = open(tmp / "jupyter.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", "--allow-root", f"--ServerApp.root_dir={REPO}",
         "--ServerApp.port_retries=0"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{(tmp / 'jupyter.log').read_text()[-3000:]}")
        try:
            api(base, token, "/api/status")
            return proc, base, token
        except OSError:
            if time.monotonic() > deadline:
                stop_lab(proc, base, token)
                raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_S} s")
            time.sleep(0.5)


def stop_lab(proc, base, token):
    try:  # shut kernels down through the server first: they run in sessions of their own
        for kernel in api(base, token, "/api/kernels") or []:
            api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE")
    except OSError:
        pass
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass


def readout_tokens(page) -> int:
    match = re.search(r"tokens\s+(\d+)", page.locator(".qwenlab-readouts").first.inner_text())
    return int(match.group(1)) if match else 0


def shot(page, name: str):
    page.locator(".qwenlab-playground").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / name))


def wait_for_kernel(page, base, token, path):
    """Until the server has an idle 'qwenlab' kernel for the notebook and the page shows it (Run All before the
    session exists pops a kernel chooser)."""
    deadline, kernel = time.monotonic() + KERNEL_START_S, None
    while time.monotonic() < deadline:
        sessions = [s for s in api(base, token, "/api/sessions") or [] if s.get("path") == path]
        kernel = sessions[0].get("kernel") if sessions else None
        if kernel and kernel.get("execution_state") == "idle":
            break
        time.sleep(0.5)
    assert kernel, f"no kernel started for {path} within {KERNEL_START_S} s"
    assert kernel["name"] == "qwenlab", f"{path} runs kernel {kernel['name']!r}, not 'qwenlab'"
    page.wait_for_function("() => { const b = document.querySelector('#jp-main-statusbar');"
                           " return b && /qwenlab/.test(b.textContent) && /Idle/.test(b.textContent); }",
                           timeout=KERNEL_START_S * 1000)


def run_all(page, done_text: str):
    """Run > Run All Cells, then wait for done_text or a traceback (which fails with the traceback)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    page.wait_for_function(
        "(done) => document.querySelector('.jp-Notebook').textContent.includes(done) || Array.from("
        " document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]'))"
        " .some(e => e.textContent.includes('Traceback'))", arg=done_text, timeout=RUN_ALL_S * 1000)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                          has_text="Traceback")
    assert errors.count() == 0, f"a cell raised:\n{errors.first.inner_text()[-3000:]}"


def open_and_run(page, base, token, path, done_text):
    page.goto(f"{base}/lab/tree/{path}?token={token}", wait_until="domcontentloaded",
              timeout=KERNEL_START_S * 1000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=KERNEL_START_S * 1000)
    wait_for_kernel(page, base, token, path)
    run_all(page, done_text)


def js_wait(page, condition: str, timeout_s: float):
    page.wait_for_function(f"() => {{ {condition} }}", timeout=timeout_s * 1000)


def drive_playground(page):
    """Type a prompt, Generate, wait for streamed text and readouts; then a long generation and Stop."""
    page.wait_for_selector(".qwenlab-playground .qwenlab-prompt textarea", timeout=60_000)
    shot(page, "01_loaded.png")

    prompt = page.locator(".qwenlab-prompt textarea").first
    prompt.fill("Count from one to ten:")
    page.locator("button:has-text('Generate')").first.click()
    js_wait(page, "const o = document.querySelector('.qwenlab-output');"
                  " const s = document.querySelector('.qwenlab-stream');"
                  " const st = document.querySelector('.qwenlab-status');"
                  " return o.textContent.includes('Count from one to ten:') && s && s.textContent.length > 0"
                  " && st.textContent.includes('done');", GENERATE_S)
    readout = page.locator(".qwenlab-readouts").first.inner_text()
    assert "tok/s" in readout and readout_tokens(page) > 0, readout
    assert page.locator(".qwenlab-stream").first.inner_text().strip(), "no streamed text"
    shot(page, "02_generated.png")

    page.locator(".qwenlab-max-new-tokens .widget-readout").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("2000")
    page.keyboard.press("Enter")
    js_wait(page, "return document.querySelector('.qwenlab-max-new-tokens .widget-readout')"
                  ".textContent.trim() === '2000';", 10)
    prompt.fill("Hello, my name is")
    page.locator("button:has-text('Generate')").first.click()
    js_wait(page, "const r = document.querySelector('.qwenlab-readouts').textContent;"
                  " const m = r.match(/tokens\\s+(\\d+)/); return r.includes('running') && m && +m[1] >= 3;",
            GENERATE_S)
    page.locator("button:has-text('Stop')").first.click()
    js_wait(page, "const s = document.querySelector('.qwenlab-stop-reason');"
                  " const st = document.querySelector('.qwenlab-status');"
                  " return s && s.textContent.trim() === 'stopped' && st.textContent.includes('stop reason stopped');",
            GENERATE_S)
    assert 3 <= readout_tokens(page) < 2000
    shot(page, "03_stopped.png")


def test_playground_in_jupyterlab(tmp_path):
    require_browser()
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    notebook_before = (REPO / NOTEBOOK).read_bytes()
    proc, base, token = start_lab(tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            try:
                open_and_run(page, base, token, NOTEBOOK, "VERDICT 07_prompt_playground")
                drive_playground(page)
            except Exception:
                page.screenshot(path=str(SHOTS / "99_failure.png"))
                print((tmp_path / "jupyter.log").read_text()[-4000:])
                raise
            finally:
                browser.close()
    finally:
        stop_lab(proc, base, token)
        if (REPO / NOTEBOOK).read_bytes() != notebook_before:  # never leave outputs in the committed notebook
            (REPO / NOTEBOOK).write_bytes(notebook_before)
    assert proc.poll() is not None, "jupyter lab is still running"
