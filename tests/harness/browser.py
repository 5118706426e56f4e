"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-
pipe``: commands on fd 3, answers on fd 4, each JSON message ended by a NUL byte), so a
test can load a page, let its scripts run, and read the text it shows, with nothing
but Debian's chromium and the standard library."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, profile: Path, log_file: Path) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            raise BrowserError("chromium is not installed; run scripts/setup.sh (it installs "
                               "Debian's chromium)")
        cmd_r, self._cmd_w = os.pipe()   # we write commands; chromium reads them on fd 3
        self._out_r, out_w = os.pipe()   # chromium writes answers on fd 4; we read them
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self._log = log_file.open("ab")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', *args],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._next_id = 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._out_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 16)
                if not chunk:
                    raise BrowserError(f"chromium exited ({self.proc.poll()}); see its log")
                self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return dict(json.loads(message))

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") != self._next_id:
                continue  # an event, or the answer to nobody
            if "error" in answer:
                raise BrowserError(f"{method}: {answer['error']}")
            return dict(answer.get("result", {}))

    def open(self, url: str) -> str:
        """A new tab on ``url``; its session id for :meth:`text`."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = str(self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
                      ["sessionId"])
        self.call("Page.navigate", {"url": url}, session)
        return session

    def text(self, session: str) -> str:
        """What the page shows as text (``document.body.innerText``)."""
        r = self.call("Runtime.evaluate", {
            "expression": "document.body ? document.body.innerText : ''", "returnByValue": True},
            session)
        return str(r.get("result", {}).get("value", ""))

    def wait_for_text(self, session: str, until: Callable[[str], bool], timeout: float) -> str:
        """Poll the page's text until ``until(text)``; the last text either way."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text(session)
            if until(text):
                return text
            time.sleep(0.5)
        return text
