"""JupyterLab in a real browser: ``00_quickstart`` opens, runs and shows its widgets the way a user sees them.

nbval proves that a kernel runs the notebook's code. This test checks what a person sees in JupyterLab: it starts
JupyterLab from the project's environment (loopback only, random free port, random token, no browser), drives
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through Selenium) to open a temporary copy of the
notebook, runs all cells from the Lab's *Run* menu, waits for the kernel to go idle and asserts:

* the kernel is the project's Python (the one running this test) and every code cell ran;
* no cell shows an error (traceback), neither in the page nor in the saved notebook;
* the metrics table and the figures rendered (decoded PNGs, not blank placeholders);
* the ipywidgets prediction browser rendered as a live widget (slider, caption, figure), not the plain-text or
  "Loading widget..." fallback, and responds to the keyboard: ArrowRight on its slider changes the shown image;
* no error in the browser console.

It saves a small screenshot of the widget (to a temporary folder; ``ENDOARSS_BROWSER_SCREENSHOT`` chooses the path). Without Chromium (or
Selenium) it is skipped, with the reason. Every wait is bounded and names what did not appear; the browser, the
server and its kernels are always shut down.

Environment knobs: ``CHROMIUM`` / ``CHROMEDRIVER`` (binaries), ``ENDOARSS_BROWSER_TIMEOUT`` (seconds for the run of
all cells, default 600), ``ENDOARSS_BROWSER_SCREENSHOT`` (where the screenshot goes; empty: nowhere),
``ENDOARSS_BROWSER_NOTEBOOK`` (another copy of the quickstart to test), ``ENDOARSS_BROWSER_ARTIFACTS`` (where a
failure leaves its screenshot, page source and logs; default: pytest's temporary folder).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(os.environ.get("ENDOARSS_BROWSER_NOTEBOOK") or REPO / "notebooks" / "00_quickstart.ipynb")
# Default: beside the other test artefacts, so `make test` leaves the committed screenshot alone; set
# ENDOARSS_BROWSER_SCREENSHOT=results/figures/jupyterlab_quickstart.png to refresh the README's picture.
SCREENSHOT = os.environ.get("ENDOARSS_BROWSER_SCREENSHOT",
                            str(Path(tempfile.gettempdir()) / "endoarss_browser" / "jupyterlab_quickstart.png"))
RUN_TIMEOUT = float(os.environ.get("ENDOARSS_BROWSER_TIMEOUT", "600"))
WINDOW = (1280, 900)

INSTALL_HINT = "`apt-get install -y chromium chromium-driver` (Debian) to run it"


def _find_browser() -> tuple[str, str]:
    """Chromium and its driver, or skip with the reason."""
    chromium = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    if missing:
        pytest.skip(f"JupyterLab browser test skipped: {' and '.join(missing)} not found; {INSTALL_HINT}")
    return chromium, driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Lab:
    """A JupyterLab server from this environment on 127.0.0.1, serving a temporary folder."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.root = workdir / "root"
        self.log = workdir / "jupyterlab.log"
        self.token = secrets.token_urlsafe(24)
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.kernels_seen: list = []  # psutil.Process of every kernel seen, killed at stop() if still alive
        (self.root / "notebooks").mkdir(parents=True)
        # The notebook's relative paths (../data/..., ../results/quickstart) resolve inside the temporary root.
        shutil.copy2(NOTEBOOK, self.root / "notebooks" / "00_quickstart.ipynb")
        settings = workdir / "lab-settings"
        # No news / update pop-ups (and no calls to the internet) in the Lab.
        (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
        (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        bin_dir = Path(sys.executable).parent
        self.env = {k: v for k, v in os.environ.items() if k not in {"JUPYTER_PATH", "MPLBACKEND", "JUPYTER_TOKEN"}}
        self.env.update({
            # Only this environment's kernels, extensions and config: nothing from the user's ~/.jupyter or
            # ~/.local/share/jupyter (a user-level python3 kernelspec would shadow the project's).
            "JUPYTER_CONFIG_DIR": str(workdir / "config"),
            "JUPYTER_DATA_DIR": str(workdir / "data-dir"),
            "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(workdir / "workspaces"),
            "ENDOARSS_DATA": str(workdir / "endoarss-data"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        jupyter = bin_dir / "jupyter"
        self.command = [str(jupyter)] if jupyter.exists() else [sys.executable, "-m", "jupyter"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", timeout: float = 5):
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def start(self, timeout: float = 90) -> None:
        for attempt in range(3):  # the free port can be taken between picking it and binding it
            self.port = _free_port()
            args = self.command + [
                "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}", "--ServerApp.terminals_enabled=False",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                args.append("--allow-root")  # CI containers run as root
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    self.api("/api/status", timeout=2)
                    return
                except (urllib.error.URLError, OSError, ValueError):
                    time.sleep(0.5)
            else:
                self.stop()
                raise AssertionError(f"JupyterLab did not answer on {self.url} within {timeout:.0f} s; "
                                     f"server log:\n{_tail(self.log)}")
            if "already in use" not in _tail(self.log, 10):
                break
        raise AssertionError(f"JupyterLab exited with code {self.process.returncode} on start; "
                             f"server log:\n{_tail(self.log)}")

    def kernel_processes(self) -> list:
        """The kernel processes the server started (psutil.Process), [] without psutil."""
        try:
            import psutil
        except ImportError:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        kernels = []
        for child in children:
            try:
                if any("ipykernel" in part for part in child.cmdline()):
                    kernels.append(child)
            except psutil.Error:
                pass
        self.kernels_seen += [k for k in kernels if k not in self.kernels_seen]
        return kernels

    def stop(self) -> None:
        """Shut kernels and server down through the API, then by signal; kill whatever is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._shutdown()
        for kernel in self.kernels_seen:  # kernels run in their own session: the process group does not reach them
            try:
                kernel.kill()
            except Exception:  # already gone (psutil also guards against a reused pid)
                pass

    def _shutdown(self) -> None:
        self.kernel_processes()
        try:
            for kernel in self.api("/api/kernels"):
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=15)
            self.api("/api/shutdown", method="POST")
        except (urllib.error.URLError, OSError, ValueError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass


def _make_driver(chromium: str, chromedriver: str, workdir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={workdir / 'chromium-profile'}", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


# One round trip that reads the visible notebook's state: kernel status and, per cell, its prompt and outputs.
STATE_JS = r"""
const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'));
if (!panel) return null;
const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
const dialog = document.querySelector('.jp-Dialog');
const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell')].map(cell => {
  const outputs = [...cell.querySelectorAll('.jp-OutputArea-output')];
  const text = outputs.map(o => o.textContent || '').join('\n');
  return {
    code: cell.classList.contains('jp-CodeCell'),
    prompt: (cell.querySelector('.jp-InputPrompt') || {}).textContent || '',
    source: (cell.querySelector('.cm-content .cm-line') || {}).textContent || '',
    mimes: outputs.map(o => o.getAttribute('data-mime-type') || ''),
    errors: [...cell.querySelectorAll('.jp-OutputArea-child')]
      .filter(c => c.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
                   && /Traceback \(most recent call last\)|^\w*(Error|Exception)\b/m.test(c.textContent))
      .map(c => c.textContent.slice(-1500)),
    stderr: outputs.filter(o => o.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr')
      .map(o => o.textContent.slice(0, 500)),
    images: [...cell.querySelectorAll('.jp-OutputArea-output img')].map(img => ({
      src: img.src.length, png: img.src.startsWith('data:image/png;base64,'),
      width: img.naturalWidth, height: img.naturalHeight, complete: img.complete})),
    tables: [...cell.querySelectorAll('.jp-OutputArea-output table')].map(t => t.textContent.slice(0, 4000)),
    widgets: cell.querySelectorAll('.jp-OutputArea-output .jupyter-widgets').length,
    text: text.slice(0, 3000),
  };
});
return {
  status: indicator ? indicator.getAttribute('data-status') : null,
  kernel: (document.querySelector('.jp-KernelStatus') || panel.querySelector('.jp-Toolbar-kernelName') || {}).innerText || '',
  dialog: dialog ? dialog.innerText.slice(0, 500) : null,
  cells: cells,
};
"""

# The prediction browser: slider value, caption and the PNG shown in its Output widget.
WIDGET_JS = r"""
const box = arguments[0];
const img = box.querySelector('.widget-output img, .jupyter-widgets-output-area img');
const readout = box.querySelector('.widget-readout');
return {
  slider: box.querySelectorAll('.widget-slider, .widget-hslider').length,
  handle: box.querySelectorAll('.noUi-handle').length,
  caption: (box.querySelector('.widget-html') || {}).textContent || null,
  readout: readout ? (readout.textContent || readout.value || '').trim() : null,
  output: box.querySelectorAll('.widget-output, .jupyter-widgets-output-area').length,
  img: img ? img.src : null,
  imgWidth: img ? img.naturalWidth : 0,
};
"""


def _prompt_number(prompt: str):
    inner = prompt.strip().lstrip("[").split("]")[0].strip()
    return int(inner) if inner.isdigit() else None


class Page:
    """Bounded waits and diagnostics around the Selenium driver."""

    def __init__(self, driver, lab: Lab, artifacts: Path, t0: float):
        self.t0 = t0  # when the fixture began starting the server
        self.driver = driver
        self.lab = lab
        self.artifacts = artifacts

    def state(self) -> dict | None:
        return self.driver.execute_script(STATE_JS)

    def console_errors(self) -> list[str]:
        try:
            entries = self.driver.get_log("browser")
        except Exception:
            return []
        return [e["message"] for e in entries if e.get("level") == "SEVERE"]

    def fail(self, message: str):
        """Fail with the message, the server log's tail and where the screenshot and page source were saved."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        try:
            self.driver.save_screenshot(str(self.artifacts / "failure.png"))
            (self.artifacts / "page.html").write_text(self.driver.page_source)
        except Exception as error:  # the browser itself may be gone
            message += f"\n(could not save the page: {error})"
        if self.lab.log.exists():
            shutil.copy2(self.lab.log, self.artifacts / "jupyterlab.log")
        pytest.fail(f"{message}\nscreenshot, page source and server log: {self.artifacts}\n"
                    f"JupyterLab log (tail):\n{_tail(self.lab.log, 25)}", pytrace=False)

    def wait(self, what: str, predicate, timeout: float, interval: float = 0.5, describe=None):
        """Poll predicate() until it returns something truthy; fail naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = predicate()
            except Exception as error:  # a stale element while the page re-renders: try again
                last, error_text = None, f"{type(error).__name__}: {error}"
            else:
                error_text = None
            if last:
                return last
            if self.lab.process.poll() is not None:
                self.fail(f"JupyterLab exited (code {self.lab.process.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                details = describe() if describe else ""
                if error_text:
                    details += f"\nlast error: {error_text}"
                self.fail(f"timed out after {timeout:.0f} s waiting for {what}{details}")
            time.sleep(interval)

    def activate_notebook(self) -> None:
        """Make the notebook the Lab's current document by clicking its tab (the menus act on it)."""
        from selenium.webdriver.common.by import By

        tabs = [t for t in self.driver.find_elements(By.CSS_SELECTOR, "#jp-main-dock-panel .lm-TabBar-tab")
                if "00_quickstart.ipynb" in t.text]
        if not tabs:
            self.fail("the notebook's tab (00_quickstart.ipynb) is not in the main area")
        tabs[0].click()

    def click_menu(self, menu: str, label: str, command: str, timeout: float = 20) -> None:
        """Open a main menu and click its item `label` (or the item that runs `command`), as a user does."""
        from selenium.webdriver.common.by import By

        def open_menu():
            entries = [e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-Menu .lm-Menu-item")
                       if (e.get_attribute("data-command") == command or e.text.strip() == label)
                       and e.is_displayed()]
            if entries:
                return entries[0]
            if not self.driver.find_elements(By.CSS_SELECTOR, ".lm-Menu"):  # clicking an open menu closes it
                for item in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item"):
                    if item.text.strip() == menu:
                        item.click()
                        break
            return None

        entry = self.wait(f'"{menu} > {label}" in the menu bar', open_menu, timeout, interval=1)
        entry.click()


@pytest.fixture
def browser_session(tmp_path):
    chromium, chromedriver = _find_browser()
    pytest.importorskip("selenium", reason="JupyterLab browser test skipped: selenium is not installed "
                                           "(pip install -e '.[test]')")
    assert NOTEBOOK.exists(), f"notebook to test not found: {NOTEBOOK}"
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.fail(f"JupyterLab is not installed in this environment ({sys.prefix}): pip install -e '.[notebooks,test]'",
                    pytrace=False)
    artifacts = Path(os.environ.get("ENDOARSS_BROWSER_ARTIFACTS") or tmp_path / "artifacts")
    t0 = time.monotonic()
    lab = Lab(tmp_path)
    driver = None

    def interrupted(signum, frame):  # a CI job killed with SIGTERM still shuts the server and the browser down
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        lab.start()
        try:
            driver = _make_driver(chromium, chromedriver, tmp_path)
        except Exception as error:
            pytest.fail(f"could not start headless Chromium ({chromium}) through {chromedriver}: {error}\n"
                        f"chromedriver log:\n{_tail(tmp_path / 'chromedriver.log')}", pytrace=False)
        yield Page(driver, lab, artifacts, t0)
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        lab.stop()
        signal.signal(signal.SIGTERM, previous)


def _code_cells(notebook: dict) -> list[int]:
    return [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"]


def _index_of(notebook: dict, needle: str) -> int:
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code" and needle in "".join(cell["source"]):
            return index
    raise AssertionError(f"no code cell of {NOTEBOOK.name} contains {needle!r}: the test needs updating")


def _save_screenshot(png: bytes, path: Path) -> int:
    """Downscale and quantise to a small palette PNG (written atomically); return its size in bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > 1100:
        image = image.resize((1100, round(image.height * 1100 / image.width)), Image.LANCZOS)
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG", optimize=True)
    os.replace(partial, path)
    return path.stat().st_size


class _Summary:
    """Prints the test's timings at the end of the pytest run (also without -s)."""

    def __init__(self):
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        if self.lines:
            terminalreporter.write_sep("-", "JupyterLab browser test")
            for line in self.lines:
                terminalreporter.write_line(line)


def _describe_cells(page: Page) -> str:
    """The kernel status, any open dialog and each code cell's prompt: for timeout messages."""
    state = page.state()
    if not state:
        return "\n(no notebook panel in the page)"
    lines = [f"\nkernel status: {state['status']!r}; kernel: {state['kernel']!r}"]
    if state["dialog"]:
        lines.append(f"an open dialog says: {state['dialog']!r}")
    lines += [f"  cell {index:2d} {cell['prompt'].strip():>6} {cell['source'][:70]}"
              for index, cell in enumerate(state["cells"]) if cell["code"]]
    return "\n".join(lines)


def _run_all(page: Page, n_cells: int) -> dict:
    """Run > Run All Cells; wait until the kernel is idle and every code cell has run (or one shows an error)."""
    page.activate_notebook()
    page.click_menu("Run", "Run All Cells", "runmenu:run-all")
    started = time.monotonic()
    poll = {"settled": 0, "next_report": started + 30}

    def finished():
        state = page.state()
        if state and time.monotonic() > poll["next_report"]:  # a progress line every 30 s (seen with pytest -s)
            poll["next_report"] += 30
            running = [f"cell {i} {c['source'][:50]!r}" for i, c in enumerate(state["cells"]) if "*" in c["prompt"]]
            print(f"  ... {time.monotonic() - started:.0f} s, running: {running[:1]}", flush=True)
        if not state or state["status"] != "idle" or len(state["cells"]) != n_cells:
            poll["settled"] = 0
            return None
        prompts = [cell["prompt"] for cell in state["cells"] if cell["code"]]
        numbers = [_prompt_number(p) for p in prompts]
        done = (not any("*" in p for p in prompts) and numbers[0] is not None
                and (all(n is not None for n in numbers) or any(cell["errors"] for cell in state["cells"])))
        poll["settled"] = poll["settled"] + 1 if done else 0
        return state if poll["settled"] >= 2 else None  # the same on two polls in a row

    return page.wait("all cells to run (Run > Run All Cells) and the kernel to go idle", finished, RUN_TIMEOUT,
                     interval=1, describe=lambda: _describe_cells(page))


def _check_widget(page: Page, cell_index: int, problems: list[str]) -> bool:
    """The prediction browser is a live widget and ArrowRight on its slider shows the next sample."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = page.driver
    cell = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")[cell_index]
    boxes = cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-vbox")
    text = cell.find_element(By.CSS_SELECTOR, ".jp-OutputArea").get_attribute("textContent")
    fallbacks = [t for t in ("Loading widget", "VBox(children", "Error displaying widget", "Failed to display",
                             "Widget Javascript not detected") if t in text]
    if fallbacks or not boxes:
        mimes = [o.get_attribute("data-mime-type") for o in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]
        problems.append(f"the prediction browser (cell {cell_index}) is not a live widget: fallback text {fallbacks}, "
                        f"{len(boxes)} widget boxes, output {text[:300]!r} (mime types {mimes}); is the "
                        f"jupyterlab_widgets extension installed in the environment that runs JupyterLab?")
        return False
    box = boxes[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)

    def widget():
        return driver.execute_script(WIDGET_JS, box)

    def widget_shown():
        now = widget()
        return now if now["slider"] and now["handle"] and now["caption"] and now["img"] and now["imgWidth"] else None

    def brief(state):
        return {k: v for k, v in state.items() if k != "img"} | {"img": (state["img"] or "")[:40]}

    before = page.wait("the prediction browser's slider, caption and figure", widget_shown, 30,
                       describe=lambda: f"\nwidget: {brief(widget())}")
    handle = box.find_element(By.CSS_SELECTOR, ".noUi-handle")
    driver.execute_script("arguments[0].focus();", handle)
    handle.send_keys(Keys.ARROW_RIGHT)

    def redrawn():
        now = widget()
        ok = (now["img"] and now["img"] != before["img"] and now["imgWidth"] and now["caption"] != before["caption"]
              and page.state()["status"] == "idle")
        return now if ok else None

    after = page.wait("the prediction browser to show another sample after ArrowRight on its slider", redrawn, 60,
                      describe=lambda: f"\nbefore: {brief(before)}\nnow: {brief(widget())}")
    if before["readout"] is not None and after["readout"] == before["readout"]:
        problems.append(f"the slider's readout did not move ({before['readout']!r} -> {after['readout']!r})")
    return True


def test_quickstart_in_jupyterlab(browser_session, request):
    page = browser_session
    driver, lab = page.driver, page.lab
    from selenium.webdriver.common.by import By

    summary = _Summary()
    try:
        request.config.pluginmanager.register(summary, "endoarss-browser-summary")
    except ValueError:  # already registered (the test ran twice in one session)
        summary = request.config.pluginmanager.get_plugin("endoarss-browser-summary")
        summary.lines.clear()

    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = _code_cells(notebook)
    table_cell = _index_of(notebook, "write_table(")
    browser_cell = _index_of(notebook, "prediction_browser(")
    figure_cells = [i for i in code_cells if "plt.show()" in "".join(notebook["cells"][i]["source"])]
    assert figure_cells, f"no code cell of {NOTEBOOK.name} calls plt.show(): the test needs updating"
    started = time.monotonic()
    timings = {"server + browser start": started - page.t0}

    # 1. Open the notebook; the kernel starts and goes idle.
    driver.get(f"{lab.url}/lab/tree/notebooks/00_quickstart.ipynb?token={lab.token}")

    def opened():
        state = page.state()
        return state and len(state["cells"]) == len(notebook["cells"]) and state["status"] == "idle"

    page.wait("the notebook to open with all its cells and an idle kernel", opened, 120,
              describe=lambda: _describe_cells(page))
    timings["open"] = time.monotonic() - started
    lab.kernel_processes()  # remember the kernel, so that teardown kills it even if the server dies first

    # 2. Run > Run All Cells.
    run_started = time.monotonic()
    cells = _run_all(page, len(notebook["cells"]))["cells"]
    timings["run all"] = time.monotonic() - run_started

    # 3. What a user sees: no errors, every code cell ran, the table and the figures are there.
    problems: list[str] = []
    for index, cell in enumerate(cells):
        problems += [f"cell {index} ({cell['source'][:60]!r}) shows an error:\n{error}" for error in cell["errors"]]
    not_run = [i for i in code_cells if _prompt_number(cells[i]["prompt"]) is None]
    if not_run:
        problems.append(f"code cells {not_run} did not run (prompts {[cells[i]['prompt'].strip() for i in not_run]})")
    ran = set(code_cells) - set(not_run)  # what did not run is reported once, above; its outputs are not checked
    stderr = {i: cells[i]["stderr"] for i in sorted(ran) if cells[i]["stderr"] and not cells[i]["errors"]}
    if stderr:  # warnings are not failures, but the reader of the log should see what the user sees
        summary.lines.append(f"stderr shown in cells (not a failure): {json.dumps(stderr)[:2000]}")

    if table_cell in ran:
        table_text = "\n".join(cells[table_cell]["tables"])
        missing = [word for word in ("prior predictor", "foundation ViT + LoRA + TESLA", "random frozen ViT",
                                     "tiny ResNet + HPS", "cls_accuracy", "seg_miou", "compat_")
                   if word not in table_text]
        if not cells[table_cell]["tables"]:
            problems.append(f"the metrics table (cell {table_cell}) did not render as an HTML table; its output: "
                            f"{cells[table_cell]['text'][:500]!r} (mime types {cells[table_cell]['mimes']})")
        elif missing:
            problems.append(f"the metrics table (cell {table_cell}) lacks {missing}: {table_text[:800]!r}")
    for index in sorted(ran.intersection(figure_cells)):
        if not any(img["png"] and img["width"] > 0 for img in cells[index]["images"]):
            problems.append(f"cell {index} ({cells[index]['source'][:50]!r}) shows no rendered figure: images "
                            f"{cells[index]['images']}, output {cells[index]['text'][:300]!r}")
    n_figures = sum(1 for cell in cells for img in cell["images"] if img["png"] and img["width"] > 0)

    # 4. The prediction browser is a live widget that answers one interaction.
    widget_ok = False
    if browser_cell in ran:
        interaction_started = time.monotonic()
        widget_ok = _check_widget(page, browser_cell, problems)
        if widget_ok:
            timings["interaction"] = time.monotonic() - interaction_started

    # 5. The kernel is this environment's Python, running in the temporary copy's folder.
    for kernel in lab.kernel_processes():
        executable = Path(kernel.cmdline()[0])
        if executable.parent != Path(sys.executable).parent:
            problems.append(f"the kernel runs {executable}, not this environment's Python ({sys.executable})")
        if Path(kernel.cwd()).resolve() != (lab.root / "notebooks").resolve():
            problems.append(f"the kernel runs in {kernel.cwd()}, not in {lab.root / 'notebooks'}")

    console = [m for m in page.console_errors() if "favicon" not in m]
    if console:
        problems.append("the browser console has errors:\n  " + "\n  ".join(console[:10]))

    # 6. Screenshot of the widget as the user sees it (left sidebar collapsed for room).
    if SCREENSHOT and widget_ok:
        for tab in driver.find_elements(By.CSS_SELECTOR, ".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current"):
            tab.click()  # clicking the open sidebar's tab collapses it
        markdown_above = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")[
            browser_cell - 1]
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", markdown_above)
        time.sleep(1)
        size = _save_screenshot(driver.get_screenshot_as_png(), Path(SCREENSHOT))
        summary.lines.append(f"screenshot: {SCREENSHOT} ({size / 1024:.0f} KiB)")

    # 7. The saved notebook agrees: no error outputs in the file either.
    page.activate_notebook()
    page.click_menu("File", "Save Notebook", "docmanager:save")
    copy = lab.root / "notebooks" / "00_quickstart.ipynb"

    def saved():
        nb = json.loads(copy.read_text())
        return nb if all(nb["cells"][i].get("execution_count") for i in ran) else None

    for index, cell in enumerate(page.wait("the Lab to save the executed notebook", saved, 30)["cells"]):
        for output in cell.get("outputs", []):
            if output["output_type"] == "error" and not cells[index]["errors"]:
                problems.append(f"saved cell {index} has an error output the page did not show as one: "
                                f"{output['ename']}: {output['evalue']}")

    timings["total"] = time.monotonic() - page.t0
    summary.lines.insert(0, "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                         + f" (shutdown not included); {n_figures} figures; widget "
                         + ("live and responding" if widget_ok else "not working" if browser_cell in ran
                            else "not checked (its cell did not run)"))
    if problems:
        page.fail("JupyterLab shows problems in the quickstart notebook:\n- " + "\n- ".join(problems))
