"""Run the gateway as a real child process, for tests, benchmarks and the demo."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

CONFIG_NAME = "gateway.toml"
LOG_NAME = "gateway.log"
GATEWAY_MODULE = "teg_gateway"


def gateway_command(
    config_path: Path | None, args: Sequence[str], module: str = GATEWAY_MODULE
) -> list[str]:
    """`python -m teg_gateway [--config PATH] ARGS...` with this interpreter."""
    command = [sys.executable, "-m", module]
    if config_path is not None:
        command += ["--config", str(config_path)]
    return [*command, *args]


def gateway_environment(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment updated with `env`, with unbuffered Python output."""
    merged = dict(os.environ)
    merged.update(env)
    merged["PYTHONUNBUFFERED"] = "1"
    return merged


def write_config(workdir: Path, config_toml: str | None) -> Path | None:
    """Write `config_toml` to `<workdir>/gateway.toml`; returns its path (None without config)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if config_toml is None:
        return None
    path = workdir / CONFIG_NAME
    path.write_text(config_toml)
    return path


class GatewayProcess:
    """The gateway (`python -m teg_gateway ...`) as a child process logging to a file.

    Output of every run is appended to `<workdir>/gateway.log`. `module` runs
    another module instead of the gateway (used to test this class itself).
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        config_toml: str | None = None,
        args: Sequence[str] = ("run",),
        *,
        module: str = GATEWAY_MODULE,
    ) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.config_toml = config_toml
        self.args = tuple(args)
        self.module = module
        self.log_path = workdir / LOG_NAME
        self._process: subprocess.Popen[bytes] | None = None
        self._run_log_offset = 0

    @property
    def command(self) -> list[str]:
        """The command line the process runs."""
        config = self.workdir / CONFIG_NAME if self.config_toml is not None else None
        return gateway_command(config, self.args, self.module)

    @property
    def pid(self) -> int | None:
        """Process id of the current (or last) run."""
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run, None while running (negative: killed by that signal)."""
        return self._process.poll() if self._process else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the process (again); its output is appended to the log file."""
        if self.running:
            raise RuntimeError("the gateway process is already running")
        write_config(self.workdir, self.config_toml)
        self._run_log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=gateway_environment(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, sig: int) -> None:
        """Send `sig` to the process."""
        if self._process is None:
            raise RuntimeError("the gateway process was never started")
        if self._process.poll() is None:
            self._process.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; subprocess.TimeoutExpired after `timeout`."""
        if self._process is None:
            raise RuntimeError("the gateway process was never started")
        return self._process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after `timeout` seconds); returns the exit status."""
        if self._process is None:
            raise RuntimeError("the gateway process was never started")
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def kill(self, *, whole_group: bool = False) -> int:
        """SIGKILL the process (with `whole_group`, also its children) and reap it."""
        if self._process is None:
            raise RuntimeError("the gateway process was never started")
        if whole_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        elif self._process.poll() is None:
            self._process.kill()
        return self._process.wait()

    def log_text(self) -> str:
        """The whole log file (all runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float = 10.0, *, this_run: bool = True) -> None:
        """Wait until `text` appears in the log; AssertionError with the log tail on timeout.

        With `this_run` (the default) only output since the last `start()` counts,
        so a restarted gateway is not matched by its earlier run's lines.
        """
        offset = self._run_log_offset if this_run else 0
        deadline = time.monotonic() + timeout
        while True:
            exited = self._process is not None and self._process.poll() is not None
            if text in self._log_since(offset):
                return
            if exited:
                raise AssertionError(
                    f"the gateway exited with status {self.returncode} before logging {text!r}\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} did not appear in the gateway log within {timeout:g} s\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(offset)
                return log_file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self.stop()


def run_command(
    workdir: Path,
    env: Mapping[str, str],
    config_toml: str | None,
    args: Sequence[str],
    timeout: float = 60.0,
    *,
    module: str = GATEWAY_MODULE,
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot gateway subcommand (e.g. `provision`, `status`) and capture its output."""
    config_path = write_config(workdir, config_toml)
    return subprocess.run(
        gateway_command(config_path, args, module),
        cwd=workdir,
        env=gateway_environment(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
