"""Open a report page in headless Chromium and record what a reader's browser would complain about.

Why the DevTools protocol rather than `chromium --dump-dom` or `--enable-logging`: the log prints console
messages without their level (an error and a log line look alike) and says nothing about failed loads or
undecodable images. Over `--remote-debugging-pipe` (the protocol as NUL-terminated JSON on file descriptors 3
and 4, no network port, no extra package) we get console messages with their level, uncaught exceptions, the
browser's own log (e.g. blocked or failed resources), every network request the page made, whether each image
decoded, and a screenshot at a fixed viewport. Used by tests/test_report.py and for docs/img/report.png:

    python -m carebench.report.browser RUNS/report/index.html --screenshot docs/img/report.png
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carebench.errors import UserError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
# What the page reports after loading (evaluated in the page; no script is ever added to the report itself).
PROBE = """JSON.stringify({
  title: document.title,
  images: document.images.length,
  broken_images: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
  sections: Array.from(document.querySelectorAll("section[id]")).map(s => s.id),
  scripts: document.scripts.length,
  text_length: document.body ? document.body.innerText.length : 0,
  height: document.documentElement.scrollHeight
})"""


class BrowserError(UserError, RuntimeError):
    """Chromium is missing, did not start, or did not load the page in time."""


@dataclass
class PageCheck:
    """What the browser saw. `errors` lists everything that should not happen on a self-contained page."""

    url: str
    console: list[tuple[str, str]] = field(default_factory=list)  # (level, text)
    exceptions: list[str] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (level, source, text)
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        out = [f"console.{lvl}: {text}" for lvl, text in self.console if lvl in ("error", "assert")]
        out += [f"uncaught: {e}" for e in self.exceptions]
        out += [f"log {src} {lvl}: {text}" for lvl, src, text in self.log if lvl == "error"]
        out += [f"failed load: {f}" for f in self.failed]
        return out


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """The DevTools protocol over the two pipes: send commands, collect events until a reply arrives."""

    def __init__(self, write_fd: int, read_fd: int, proc: subprocess.Popen, deadline: float) -> None:
        self.w, self.r, self.proc, self.deadline = write_fd, read_fd, proc, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.w, data) :]
        return self.next_id

    def _pump(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BrowserError("chromium: timed out waiting for the page")
        ready, _, _ = select.select([self.r], [], [], min(left, 0.5))
        if not ready:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self.proc.returncode}")
            return
        chunk = os.read(self.r, 1 << 20)
        if not chunk:
            raise BrowserError("chromium closed the DevTools pipe")
        self.buf += chunk
        *msgs, self.buf = self.buf.split(b"\0")
        for raw in msgs:
            msg = json.loads(raw)
            if "id" in msg:
                self.replies[msg["id"]] = msg
            else:
                self.events.append(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        mid = self.send(method, params, session)
        while mid not in self.replies:
            self._pump()
        reply = self.replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"chromium: {method} failed: {reply['error'].get('message')}")
        return reply.get("result", {})

    def wait_event(self, method: str) -> dict[str, Any]:
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev.get("method") == method:
                    return ev
            seen = len(self.events)
            self._pump()

    def settle(self, seconds: float) -> None:
        end = min(self.deadline, time.monotonic() + seconds)
        while time.monotonic() < end:
            ready, _, _ = select.select([self.r], [], [], max(0.0, end - time.monotonic()))
            if ready:
                self._pump()


def _launch(chromium: str, profile: str, width: int, height: int) -> tuple[subprocess.Popen, int, int]:
    to_child_r, to_child_w = os.pipe()  # chromium reads commands on fd 3
    from_child_r, from_child_w = os.pipe()  # and writes replies and events on fd 4

    def fds() -> None:  # in the child, before exec: put the pipe ends on 3 and 4 (the protocol's numbers)
        a, b = os.dup(to_child_r), os.dup(from_child_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    # After two os.pipe() calls fds 3 and 4 are open in this process, so keeping them is always valid.
    proc = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(3, 4),
        preexec_fn=fds,
    )
    os.close(to_child_r)
    os.close(from_child_w)
    return proc, to_child_w, from_child_r


def check_page(
    html: str | Path,
    *,
    screenshot: str | Path | None = None,
    width: int = 1280,
    height: int = 2400,
    timeout: float = 60.0,
    settle: float = 0.5,
    chromium: str | None = None,
) -> PageCheck:
    """Load `html` (a file) in headless Chromium; record console, exceptions, log, requests, image decoding;
    optionally save a PNG screenshot of the top `width` x `height` pixels."""
    path = Path(html).absolute()
    if not path.is_file():
        raise BrowserError(f"{path}: no such file")
    exe = chromium or find_chromium()
    if exe is None:
        raise BrowserError("chromium not found on PATH (Debian: apt-get install chromium)")
    check = PageCheck(url=path.as_uri())
    with tempfile.TemporaryDirectory(prefix="carebench-chromium-") as profile:
        proc, w, r = _launch(exe, profile, width, height)
        pipe = _Pipe(w, r, proc, time.monotonic() + timeout)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session,
            )
            start = len(pipe.events)
            nav = pipe.call("Page.navigate", {"url": check.url}, session)
            if nav.get("errorText"):
                raise BrowserError(f"chromium: cannot open {check.url}: {nav['errorText']}")
            pipe.wait_event("Page.loadEventFired")
            pipe.settle(settle)
            probe = pipe.call("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session)
            check.probe = json.loads(probe["result"]["value"])
            if screenshot is not None:
                shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            _record(check, pipe.events[start:])
            try:
                pipe.call("Browser.close")
            except BrowserError:
                pass
        finally:
            for fd in (w, r):
                os.close(fd)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return check


def _record(check: PageCheck, events: list[dict[str, Any]]) -> None:
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            check.console.append((p.get("type", ""), text))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            check.exceptions.append(
                f"{d.get('text', '')} {d.get('exception', {}).get('description', '')}".strip()
            )
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            check.log.append((e.get("level", ""), e.get("source", ""), e.get("text", "")))
        elif method == "Network.requestWillBeSent":
            check.requests.append(p.get("request", {}).get("url", "")[:200])
        elif method == "Network.loadingFailed":
            check.failed.append(f"{p.get('errorText', '')} ({p.get('type', '')})")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Check a report page in headless Chromium; optional screenshot.")
    ap.add_argument("html")
    ap.add_argument("--screenshot")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    a = ap.parse_args(argv)
    check = check_page(a.html, screenshot=a.screenshot, width=a.width, height=a.height)
    print(
        json.dumps({"probe": check.probe, "errors": check.errors, "requests": len(check.requests)}, indent=2)
    )
    return 1 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
