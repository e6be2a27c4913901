"""Headless Chromium driven over the DevTools protocol through a pipe: open a page, read what it rendered, take a
screenshot. No driver, no browser download and no port: Chromium's ``--remote-debugging-pipe`` reads protocol
messages (JSON, each ended by a NUL byte) on its file descriptor 3 and answers on 4.

Usage::

    with Chromium() as browser:                    # finds `chromium` on PATH, or $VLMTUNE_CHROMIUM
        page = browser.open(Path("report.html").resolve().as_uri())
        n = page.evaluate("document.querySelectorAll('svg').length")
        page.screenshot("report.png")              # the whole page, not only the window
        assert not page.errors                     # console errors, uncaught exceptions, failed loads
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = ("install it: apt-get install -y chromium (Debian/Ubuntu), or set VLMTUNE_CHROMIUM to a Chromium or "
                "Chrome executable")


class BrowserError(VlmtuneError, RuntimeError):
    """Chromium missing, not starting, or a protocol call that failed or timed out."""


def find_chromium() -> str:
    """The Chromium executable: $VLMTUNE_CHROMIUM, else the first of CANDIDATES on PATH; a clear error if none."""
    named = os.environ.get("VLMTUNE_CHROMIUM")
    if named:
        path = shutil.which(named)
        if path is None:
            raise BrowserError(f"VLMTUNE_CHROMIUM={named!r} is not an executable; {INSTALL_HINT}")
        return path
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError(f"headless Chromium is needed and none of {', '.join(CANDIDATES)} is on PATH; {INSTALL_HINT}")


class Page:
    """One tab; ``errors`` collects what the page's console would show as errors."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session
        self.errors: list[str] = []
        self.requests: list[str] = []  # every URL the page asked for (data: and file: included)

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (JSON-able), evaluated in the page; a thrown error is raised."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"page script failed: {_exception_text(result['exceptionDetails'])}")
        return result["result"].get("value")

    def screenshot(self, path: str | Path, width: int = 1280, full_page: bool = True) -> Path:
        """A PNG of the page at ``width`` CSS pixels, the whole height when ``full_page``."""
        height = 800
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            height = max(1, int(metrics["cssContentSize"]["height"] + 0.5))
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path = Path(path)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.exceptionThrown":
            self.errors.append(f"uncaught: {_exception_text(params['exceptionDetails'])}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])


def _exception_text(details: dict) -> str:
    exc = details.get("exception") or {}
    return f"{details.get('text', '')} {exc.get('description', '')}".strip()


class Chromium:
    """A headless Chromium process (a context manager); ``open(url)`` gives a loaded :class:`Page`."""

    def __init__(self, executable: str | None = None, timeout_s: float = 30.0):
        self.executable = executable or find_chromium()
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.pages: dict[str, Page] = {}
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict] = []

    def __enter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="vlmtune-chromium-")
        self.stderr = open(Path(self.profile) / "stderr.txt", "w+b")  # closed in __exit__
        to_child, self._write_fd = os.pipe()
        self._read_fd, from_child = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec: the pipe ends where Chromium expects them
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        args = [self.executable, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                "--force-color-profile=srgb"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox
        try:
            self.proc = subprocess.Popen([*args, "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self.stderr, pass_fds=(to_child, from_child, 3, 4),
                                         preexec_fn=as_fds_3_and_4)
        finally:
            os.close(to_child)
            os.close(from_child)
        try:
            self.call("Browser.getVersion")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._send("Browser.close", {}, None)
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for fd in (self._write_fd, self._read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _send(self, method: str, params: dict, session: str | None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._read_fd], [], [], max(left, 0))
            if not ready:
                raise BrowserError(f"Chromium did not answer within {self.timeout_s:.0f} s")
            chunk = os.read(self._read_fd, 1 << 20)
            if not chunk:
                self.stderr.seek(0)
                tail = self.stderr.read()[-2000:].decode(errors="replace")
                raise BrowserError(f"Chromium ({self.executable}) exited; its last output:\n{tail}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _dispatch(self, message: dict) -> None:
        page = self.pages.get(message.get("sessionId", ""))
        if page is not None:
            page._event(message["method"], message.get("params", {}))
        self._events.append(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one protocol command and wait for its answer; events that arrive meanwhile are dispatched."""
        wanted = self._send(method, params or {}, session)
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._receive(deadline)
            if "method" in message:
                self._dispatch(message)
            elif message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})

    def wait_for(self, method: str, session: str) -> dict:
        """The first event ``method`` of ``session`` (one that already arrived counts)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self._events.pop(i)
            message = self._receive(deadline)
            if "method" in message:
                self._dispatch(message)

    def open(self, url: str, width: int = 1280, height: int = 800) -> Page:
        """A new tab at ``url``, returned once its load event fired."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = self.pages[session] = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        self._events.clear()
        navigated = page.call("Page.navigate", {"url": url})
        if navigated.get("errorText"):
            raise BrowserError(f"could not open {url}: {navigated['errorText']}")
        self.wait_for("Page.loadEventFired", session)
        return page
