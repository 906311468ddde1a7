"""``teg-gateway sandbox`` as a user runs it: Ctrl-C stops every child in order and leaves
nothing running; a controller stopped on its own is not reported as lost records."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import alive, needs_mosquitto
from teg_gateway.sandbox.process import gateway_environment

pytestmark = needs_mosquitto

WAIT = 90.0


class Sandbox:
    """``python -m teg_gateway sandbox`` in its own process group, its output collected."""

    def __init__(self, workdir: Path, seconds: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "teg_gateway", "sandbox", "--seconds", str(seconds),
             "--rate", "20", "--workdir", str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=gateway_environment({}), start_new_session=True, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output)
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the sandbox output:\n{self.output}")

    def descendants(self) -> list[int]:
        """Every process below the sandbox (in any session)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process.poll() is None:
            for pid in self.descendants():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()

    def finish(self) -> int:
        try:
            code = self.process.wait(WAIT)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(10)
        return code


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_ctrl_c_stops_every_child_and_exits_130(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sandbox", seconds=120) as sandbox:
        sandbox.wait_for(r"ThingsBoard has [1-9]\d*/")
        children = sandbox.descendants()
        names = " ".join(cmdline(pid) for pid in children)
        assert "mosquitto" in names and "sandbox.controller" in names
        assert "gateway.toml run" in names
        # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(sandbox.process.pid, signal.SIGINT)
        code = sandbox.finish()
    output = sandbox.output
    assert code == 130, output
    assert "Traceback" not in output
    assert "\nstopped\n" in output + "\n"
    match = re.search(r"interrupted: the sample controller wrote (\d+) records, (\d+) reached "
                      r"ThingsBoard", output)
    assert match, output
    assert int(match[1]) >= int(match[2]) > 0
    assert "PROBLEM" not in output
    assert f"rm -rf {tmp_path / 'sandbox'}" in output
    left = [pid for pid in children if alive(pid)]
    assert not left, [cmdline(pid) for pid in left]


def test_a_controller_stopped_alone_is_not_reported_as_lost_records(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sandbox", seconds=120) as sandbox:
        sandbox.wait_for(r"ThingsBoard has [1-9]\d*/")
        controller = [pid for pid in sandbox.descendants()
                      if "sandbox.controller" in cmdline(pid)]
        assert len(controller) == 1
        os.kill(controller[0], signal.SIGINT)
        code = sandbox.finish()
    output = sandbox.output
    written = re.search(r"the sample controller stopped early, after (\d+) records", output)
    assert written, output
    assert f"OK: every record the sample controller wrote ({written[1]}) reached" in output
    assert code == 0, output
    assert "PROBLEM" not in output
