"""Headless Chromium driven over the DevTools protocol on a pipe: viewer.html's tests, benchmark and screenshots.

`--remote-debugging-pipe` makes Chromium read commands on fd 3 and write replies and events on fd 4, each a JSON object
ended by a NUL byte: no websocket client, no port, nothing beyond the standard library. WebGL runs on SwiftShader
(software GL), so no GPU is needed; the network is switched off (`--host-resolver-rules`), so a page that reached out
for a CDN would fail, and every request the page makes is recorded (`requests`) for the tests to check.

    with HeadlessChromium(find_chromium()) as browser:
        page = browser.open("file:///tmp/viewer.html?frame=3", width=256, height=256)
        page.wait_for(READY_JS)  # pipeline/viewer.py
        png = page.screenshot()
        assert not page.errors()
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless=new", "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1", "--force-color-profile=srgb",
    # Software WebGL: ANGLE on SwiftShader (Chromium no longer falls back to it unless told that is fine).
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
    # No network: every host name fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH; None when there is none."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class DevToolsError(RuntimeError):
    pass


class HeadlessChromium:
    """One Chromium process; `open` gives pages (tabs). Use as a context manager: the process ends with the block."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="gvf-chromium-")
        self._log = open(Path(self._profile.name) / "stderr.log", "wb+")
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()

        def give_pipe_fds():  # in the child, before exec: the pipe ends become fds 3 (commands in) and 4 (replies out)
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        args = [binary, *FLAGS, f"--user-data-dir={self._profile.name}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox (CI runs as root)
        # close_fds=False so fds 3 and 4 survive exec; Python opens every other fd non-inheritable, so nothing else leaks.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     preexec_fn=give_pipe_fds, close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._out, self._in = to_chrome_w, from_chrome_r
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    # protocol ------------------------------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("no message from Chromium in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise DevToolsError(f"Chromium closed the pipe (exit status {self.proc.poll()}): {self.stderr_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, timeout: float | None = None, **params) -> dict:
        """Run one command and return its result; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str | None = None, timeout: float | None = None) -> dict:
        """The params of the next event `method` (of `session`), among those kept or still to come."""
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    self.events.remove(event)
                    return event["params"]
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def pump(self, seconds: float) -> None:
        """Collect events for a while (the page runs meanwhile)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    def stderr_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    # pages ---------------------------------------------------------------------------------------------------------
    def open(self, url: str, width: int, height: int) -> "Page":
        """A new tab of a fixed viewport (CSS pixels = device pixels) showing `url`, returned once it has loaded."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, session, url, target)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired", session)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except (DevToolsError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        self._profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    def __init__(self, browser: HeadlessChromium, session: str, url: str, target: str):
        self.browser, self.session, self.url, self.target = browser, session, url, target

    def close(self) -> None:
        """Close the tab (its worker and GL context go with it)."""
        self.browser.send("Target.closeTarget", targetId=self.target)

    def evaluate(self, expression: str, timeout: float | None = None):
        """The value of a JavaScript expression (promises awaited); a thrown exception raises DevToolsError."""
        result = self.browser.send("Runtime.evaluate", self.session, timeout=timeout, expression=expression,
                                   returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.1):
        """Poll until the expression is truthy; returns its value. An error on the page ends the wait at once
        (DevToolsError); TimeoutError names the page's errors so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            if self.errors():
                raise DevToolsError(f"while waiting for {expression!r}, the page reported: {self.errors()}")
            self.browser.pump(poll)
        raise TimeoutError(f"waited {timeout:.0f} s for {expression!r}; page errors: {self.errors()}")

    def screenshot(self) -> bytes:
        """PNG of the viewport."""
        return base64.b64decode(self.browser.send("Page.captureScreenshot", self.session, format="png")["data"])

    def _events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events if e.get("method") == method and e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error / console.assert calls and error-level log entries (failed loads, GL)."""
        out = [e["exceptionDetails"].get("exception", {}).get("description") or e["exceptionDetails"].get("text", "")
               for e in self._events("Runtime.exceptionThrown")]
        out += [" ".join(str(a.get("value", a.get("description", ""))) for a in e["args"])
                for e in self._events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
        out += [e["entry"]["text"] for e in self._events("Log.entryAdded") if e["entry"]["level"] == "error"]
        return out

    def console(self) -> list[str]:
        """Every console message, for diagnostics."""
        return [f"{e['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in e["args"])
                for e in self._events("Runtime.consoleAPICalled")]

    def requests(self) -> list[str]:
        """URLs of every request the page made (documents, scripts, workers, data: and blob: URLs)."""
        return [e["request"]["url"] for e in self._events("Network.requestWillBeSent")]
