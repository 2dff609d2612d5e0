"""Opens a local HTML file in headless Chromium over the DevTools protocol: console errors, DOM queries, a screenshot."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# .ci/run sets it: under CI a missing browser is a failure, elsewhere the test skips.
REQUIRE_ENV = "REQUIRE_BROWSER"


def browser_or_skip() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    why = (f"no headless browser ({', '.join(BROWSERS)}) on PATH; "
           "install Debian's chromium: apt-get install chromium")
    if os.environ.get(REQUIRE_ENV) or os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


class Page:
    """One headless Chromium with one tab, driven through the DevTools protocol."""

    def __init__(self, browser: str, timeout: float = 60.0):
        from websockets.sync.client import connect

        self.timeout = timeout
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._devtools_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        page = next(t for t in targets if t.get("type") == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.events: list[dict] = []
        self._next_id = 0
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    def _devtools_port(self) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"the browser exited with {self.process.returncode}")
            time.sleep(0.1)
        raise RuntimeError("the browser did not open its DevTools port")

    def send(self, method: str, **params: Any) -> dict:
        self._next_id += 1
        ident = self._next_id
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(message)

    def open(self, path: Path) -> None:
        self.send("Page.navigate", url=path.resolve().as_uri())
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the page never showed {what}")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error-level log entries so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(details.get("exception", {}).get("description")
                             or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description")))
                                      for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found

    def screenshot(self, path: Path) -> None:
        """The whole page, not only the window."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                               "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


# What the report page shows, read from the rendered DOM (plotly draws each bar as a `.point`).
REPORT_PROBE = """(() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const bars = [...document.querySelectorAll('#per-node .barlayer .point')];
  return {
    plots: plots.map(p => p.id),
    drawn: plots.every(p => p.querySelector('.main-svg') !== null),
    node_bars: bars.length,
    node_labels: [...document.querySelectorAll('#per-node .xtick text')].map(t => t.textContent),
    bar_texts: [...document.querySelectorAll('#per-node .bartext')].map(t => t.textContent),
    bar_colors: bars.map(b => b.querySelector('path').style.fill),
    warnings: [...document.querySelectorAll('.warning')].map(w => w.textContent),
    external: [...document.querySelectorAll('script[src], link[href]')].map(e => e.src || e.href),
  };
})()"""


def inspect_report(html: Path, screenshot: Path) -> dict:
    """Opens a load_test.py --report page and returns what it rendered and any script errors."""
    page = Page(browser_or_skip())
    try:
        page.open(html)
        page.wait_for("document.querySelectorAll('.js-plotly-plot').length > 0 && "
                      "[...document.querySelectorAll('.js-plotly-plot')]"
                      ".every(p => p.querySelector('.main-svg'))", "its charts drawn")
        seen = page.evaluate(REPORT_PROBE)
        page.screenshot(screenshot)
        seen["errors"] = page.errors()
        return seen
    finally:
        page.close()
