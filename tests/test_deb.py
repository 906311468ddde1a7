"""The Debian package, for real: scripts/build-deb, then dpkg -i on this machine, the
installed command, the gateway run as the teg user, conffiles and modes, a reinstall that
keeps the operator's edits, and dpkg --purge leaving nothing behind (the data directory
only when asked to keep it).

It installs a system package, so it runs only as root on a Debian system with dpkg, and
not where a teg-gateway package is already installed (CI runs as root on Debian 12). No
systemd runs as PID 1 there: the maintainer scripts must cope, and the unit is checked with
systemd-analyze instead (when installed). On demand, TEG_TEST_SYSTEMD_CONTAINER=1 also runs
the package under a real systemd booted in a podman container.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from container_engine import CONTAINERS_CONF
from teg_gateway import __version__

ROOT = Path(__file__).resolve().parent.parent
UNIT = Path("/lib/systemd/system/teg-gateway.service")
ETC = Path("/etc/teg-gateway")
DATA = Path("/var/lib/teg-gateway")
VENV = Path("/opt/teg-gateway")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/teg-gateway.service")
CONFFILES = {"/etc/teg-gateway/teg-gateway.toml", "/etc/teg-gateway/teg-gateway.env",
             "/etc/sudoers.d/teg-gateway"}


def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0 and "ok installed" in result.stdout


def _skip_reason() -> str | None:
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        return "dpkg and dpkg-deb are needed (a Debian system)"
    if os.geteuid() != 0:
        return "installing a package needs root (CI runs as root)"
    if not Path("/usr/bin/python3").exists() or not _installed("python3-venv"):
        return "the package depends on python3 and python3-venv (apt-get install python3-venv)"
    if _installed("teg-gateway") or VENV.exists():
        return "teg-gateway is already installed on this machine; not touching it"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def run(*command: str, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def mode_owner(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return (oct(stat.S_IMODE(info.st_mode)), pwd.getpwuid(info.st_uid).pw_name,
            grp.getgrgid(info.st_gid).gr_name)


@pytest.fixture(scope="module")
def deb() -> Path:
    result = run(str(ROOT / "scripts" / "build-deb"),
                 env={**os.environ, "PYTHON": sys.executable})
    path = ROOT / result.stdout.strip().splitlines()[-1]
    assert path.name == f"teg-gateway_{__version__}_all.deb"
    return path


@pytest.fixture
def purge_at_the_end() -> Iterator[None]:
    yield
    if _installed("teg-gateway") or Path("/var/lib/dpkg/info/teg-gateway.list").exists():
        run("dpkg", "--purge", "teg-gateway", env={**os.environ, "TEG_PURGE_DATA": "1"},
            check=False)
    shutil.rmtree(DATA, ignore_errors=True)


def test_the_package_is_architecture_independent_with_pure_wheels(deb: Path) -> None:
    control = run("dpkg-deb", "--field", str(deb)).stdout
    assert "Architecture: all" in control
    assert re.search(r"^Depends: python3 \(>= 3\.11\), python3-venv", control, re.MULTILINE)
    assert re.search(r"^Recommends: mosquitto, sudo", control, re.MULTILINE)
    files = run("dpkg-deb", "--contents", str(deb)).stdout
    wheels = re.findall(r"usr/share/teg-gateway/wheels/(\S+\.whl)", files)
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"teg_gateway", "paho_mqtt", "docker"} <= names, wheels
    assert "mmh3" not in names
    assert all(w.endswith("-none-any.whl") for w in wheels), wheels


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_as_teg_with_notify() -> None:
    """The installed gateway, as the teg user, with a notify socket as systemd gives it:
    READY=1 without ThingsBoard, STOPPING=1 and exit 0 on SIGTERM; its files owned by teg."""
    shared = Path(tempfile.mkdtemp(prefix="teg-deb-"))
    try:
        shared.chmod(0o755)
        config = shared / "gateway.toml"
        config.write_text(f'[paths]\ndata = "{DATA}"\n[local_mqtt]\nenabled = false\n')
        config.chmod(0o644)
        address = str(shared / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(address)
            Path(address).chmod(0o666)
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": address,
                   "TB_HOST": "127.0.0.1", "TB_PORT": str(closed_port()),
                   "THINGSBOARD_PROVISION_DEVICE_KEY": "key",
                   "THINGSBOARD_PROVISION_DEVICE_SECRET": "secret"}
            process = subprocess.Popen(
                ["setpriv", "--reuid=teg", "--regid=teg", "--init-groups", "--",
                 "/usr/bin/teg-gateway", "--config", str(config), "run"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                received: list[str] = []
                deadline = time.monotonic() + 30
                listener.settimeout(1.0)
                while "READY=1" not in received and time.monotonic() < deadline:
                    try:
                        received += listener.recv(4096).decode().split("\n")
                    except TimeoutError:
                        assert process.poll() is None, "the gateway exited"
                assert "READY=1" in received, received
                process.send_signal(signal.SIGTERM)
                output, _ = process.communicate(timeout=60)
                with contextlib.suppress(TimeoutError):
                    while "STOPPING=1" not in received:
                        received += listener.recv(4096).decode().split("\n")
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        assert process.returncode == 0, output.decode(errors="replace")
        assert "STOPPING=1" in received, received
        for path in DATA.iterdir():
            assert mode_owner(path)[1] == "teg", path
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_install_run_reinstall_and_purge(deb: Path, purge_at_the_end: None) -> None:
    packaged = [line.split(None, 5)[5].split(" -> ")[0].lstrip(".")
                for line in run("dpkg-deb", "--contents", str(deb)).stdout.splitlines()]
    packaged_files = {p for p in packaged if p and not p.endswith("/")}
    assert "/usr/bin/teg-gateway" in packaged_files

    run("dpkg", "-i", str(deb))  # no systemd as PID 1 here: postinst copes

    # The command, from the environment postinst built out of the bundled wheels.
    assert run("/usr/bin/teg-gateway", "--version").stdout.strip() == \
        f"teg-gateway {__version__}"
    assert Path("/usr/bin/teg-gateway").resolve().is_relative_to(VENV)
    status = run("runuser", "-u", "teg", "--", "/usr/bin/teg-gateway", "--config",
                 str(ETC / "teg-gateway.toml"), "status").stdout
    assert f"data directory: {DATA}" in status and "provisioned: no" in status
    # The preflight, as teg with the service's settings, against an unreachable host: one
    # line per step and a failure with its fix, no traceback.
    check = run("runuser", "-u", "teg", "--", "/usr/bin/teg-gateway", "--config",
                str(ETC / "teg-gateway.toml"), "check", check=False,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TB_HOST": "127.0.0.1",
                     "TB_PORT": str(closed_port())})
    assert check.returncode == 1, check.stdout + check.stderr
    assert "✓" in check.stdout and "✗" in check.stdout
    assert "Traceback" not in check.stdout + check.stderr

    # Conffiles, the user, modes and owners.
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "teg-gateway").stdout
    assert {line.split()[0] for line in conffiles.strip().splitlines()} == CONFFILES
    assert run("getent", "passwd", "teg").stdout.strip().endswith(":/usr/sbin/nologin")
    assert mode_owner(ETC / "teg-gateway.env") == ("0o600", "root", "root")
    assert mode_owner(ETC / "teg-gateway.toml") == ("0o640", "root", "teg")
    assert mode_owner(ETC) == ("0o750", "root", "teg")
    assert mode_owner(Path("/etc/sudoers.d/teg-gateway")) == ("0o440", "root", "root")
    assert mode_owner(DATA) == ("0o750", "teg", "teg")
    env_text = (ETC / "teg-gateway.env").read_text()
    assert "\nTB_HOST=\n" in env_text and "#TEG_DATA_PATH=" in env_text
    if shutil.which("visudo") and shutil.which("sudo"):
        # The rule is precise: reboot and poweroff without arguments, nothing else.
        run("visudo", "-c", "-f", "/etc/sudoers.d/teg-gateway")
        for allowed in (["reboot"], ["poweroff"]):
            run("runuser", "-u", "teg", "--", "sudo", "-n", "-l", *allowed)
        for refused in (["reboot", "now"], ["shutdown", "-h", "now"], ["sh"]):
            result = run("runuser", "-u", "teg", "--", "sudo", "-n", "-l", *refused,
                         check=False)
            assert result.returncode != 0, refused

    # The unit: enabled (a symlink, even without systemd running), valid, and skipped by
    # its ExecCondition until a ThingsBoard host is set.
    assert WANTS.is_symlink() and os.readlink(WANTS) == str(UNIT)
    if shutil.which("systemd-analyze"):
        result = run("systemd-analyze", "verify", str(UNIT), check=False)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    condition = ["runuser", "-u", "teg", "--", str(VENV / "bin" / "python"), "-m",
                 "teg_gateway.systemd", "--config", str(ETC / "teg-gateway.toml")]
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    skipped = run(*condition, env=clean, check=False)
    assert skipped.returncode == 1 and "TB_HOST" in skipped.stderr
    run(*condition, env={**clean, "TB_HOST": "tb.example.com"})

    run_as_teg_with_notify()

    # A reinstall (as an upgrade would) keeps the operator's edits and rebuilds the venv.
    (ETC / "teg-gateway.env").write_text(env_text.replace("\nTB_HOST=\n",
                                                          "\nTB_HOST=tb.example.com\n"))
    (DATA / "outbox.db").touch()
    run("dpkg", "-i", "--force-confold", str(deb))
    assert "\nTB_HOST=tb.example.com\n" in (ETC / "teg-gateway.env").read_text()
    assert mode_owner(ETC / "teg-gateway.env") == ("0o600", "root", "root")
    assert run("/usr/bin/teg-gateway", "--version").returncode == 0

    # Purge keeps the data (records not sent yet, the device's token) unless asked.
    run("dpkg", "--purge", "teg-gateway")
    left = [p for p in packaged_files if os.path.lexists(p)]
    assert not left, left
    for gone in (VENV, ETC, UNIT, WANTS, Path("/usr/bin/teg-gateway")):
        assert not os.path.lexists(gone), gone
    assert (DATA / "outbox.db").exists()

    run("dpkg", "-i", str(deb))
    run("dpkg", "--purge", "teg-gateway", env={**os.environ, "TEG_PURGE_DATA": "1"})
    for gone in (VENV, ETC, UNIT, WANTS, DATA):
        assert not os.path.lexists(gone), gone


# -- under a real systemd (on demand) -------------------------------------------------------

PUBLISH_RESTART = """\
import json, time
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
client.connect("127.0.0.1", 1883)
client.loop_start()
client.publish("te/device/main///cmd/restart/systemd-test", json.dumps({"status": "init"}),
               qos=1, retain=True).wait_for_publish()
time.sleep(1)
"""


# The README's command line for running teg-gateway as the service does.
SERVICE_RUN = ("systemd-run --quiet --pipe --wait --collect -p User=teg "
               "-p EnvironmentFile=/etc/teg-gateway/teg-gateway.env "
               "/usr/bin/teg-gateway --config /etc/teg-gateway/teg-gateway.toml")


class SystemdContainer:
    """systemd as PID 1 in a podman container whose root is an overlay of this machine's
    (changes are thrown away), with podman's state in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        (workdir / "containers.conf").write_text(CONTAINERS_CONF)
        self.podman = ["podman", "--root", str(workdir / "root"),
                       "--runroot", str(workdir / "runroot")]
        self.env = {**os.environ, "CONTAINERS_CONF": str(workdir / "containers.conf")}
        self.name = f"teg-systemd-{os.getpid()}"

    def start(self) -> None:
        tmpfs = [arg for path in ("/tmp", "/run", "/var/tmp")
                 for arg in ("--tmpfs", f"{path}:rw,notmpcopyup")]
        run(*self.podman, "run", "-d", "--name", self.name, "--network", "none",
            "--systemd=always", *tmpfs, "--rootfs", "/:O", "/lib/systemd/systemd", env=self.env)
        self.wait_until(lambda: self.sh("systemctl is-system-running", check=False).stdout
                        .strip() in ("running", "degraded"), 60, "systemd did not come up")

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.podman, "exec", self.name, "sh", "-c", command, env=self.env,
                   check=check)

    def show(self, prop: str) -> str:
        return self.sh(f"systemctl show teg-gateway -p {prop} --value").stdout.strip()

    def journal(self) -> str:
        return self.sh("journalctl --no-pager -o cat", check=False).stdout

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout:g} s\n{self.journal()[-3000:]}")
            time.sleep(0.5)

    def remove(self) -> None:
        run(*self.podman, "rm", "-f", "-t", "0", self.name, env=self.env, check=False)


def _systemd_container_skip() -> str | None:
    if os.environ.get("TEG_TEST_SYSTEMD_CONTAINER") != "1":
        return ("boots systemd in a podman container and waits out the watchdog (about "
                "90 s): set TEG_TEST_SYSTEMD_CONTAINER=1 to run it")
    if shutil.which("podman") is None or not Path("/lib/systemd/systemd").exists():
        return "needs podman and systemd installed"
    return None


@pytest.mark.skipif(_systemd_container_skip() is not None,
                    reason=str(_systemd_container_skip()))
def test_the_package_under_systemd(deb: Path) -> None:
    # podman wants a short run directory (at most 50 characters).
    workdir = Path(tempfile.mkdtemp(prefix="teg-sd-"))
    container = SystemdContainer(workdir)
    try:
        container.start()
        run(*container.podman, "cp", str(deb), f"{container.name}:/root/teg-gateway.deb",
            env=container.env)
        # Images often forbid starting services from maintainer scripts: not this one.
        container.sh("rm -f /usr/sbin/policy-rc.d && dpkg -i /root/teg-gateway.deb")

        # Enabled and started at installation, but skipped (not failed) without a host.
        assert container.show("UnitFileState") == "enabled"
        assert container.show("Result") == "exec-condition"
        assert container.show("ActiveState") == "inactive"
        assert "no ThingsBoard host configured yet" in container.journal()

        # With a host (unreachable here): Type=notify reaches active without ThingsBoard.
        container.sh(
            "sed -i -e 's/^TB_HOST=$/TB_HOST=127.0.0.1/' -e 's/^#TB_PORT=8883$/TB_PORT=1/' "
            "-e 's/^THINGSBOARD_PROVISION_DEVICE_KEY=$/THINGSBOARD_PROVISION_DEVICE_KEY=k/' "
            "-e 's/^THINGSBOARD_PROVISION_DEVICE_SECRET=$/THINGSBOARD_PROVISION_DEVICE_SECRET"
            "=s/' /etc/teg-gateway/teg-gateway.env && systemctl restart teg-gateway")
        assert container.show("ActiveState") == "active"
        assert container.show("StatusText").startswith("ThingsBoard: ")
        # The README's way to run a command with the service's settings, as teg.
        check = container.sh(f"{SERVICE_RUN} check", check=False)
        assert check.returncode == 1 and "✗" in check.stdout, check.stdout + check.stderr
        first = container.show("MainPID")

        # The watchdog pings keep it running past WatchdogSec...
        time.sleep(35)
        assert container.show("MainPID") == first and container.show("NRestarts") == "0"
        # ...and a frozen gateway is killed and restarted.
        container.sh(f"kill -STOP {first}")
        container.wait_until(lambda: container.show("NRestarts") == "1"
                             and container.show("ActiveState") == "active", 60,
                             "no watchdog restart")
        assert "Watchdog timeout" in container.journal()

        # A stop is clean.
        container.sh("systemctl stop teg-gateway")
        assert container.show("Result") == "success"
        assert container.show("ExecMainStatus") == "0"

        # The restart operation's `sudo reboot`, run by the gateway as teg inside the unit's
        # sandbox, reboots the (container's) system.
        container.sh("systemctl start mosquitto teg-gateway")
        container.wait_until(lambda: "local broker: connected" in container.journal(), 30,
                             "the gateway did not reach the local broker")
        container.sh(f"cat > /root/publish.py <<'EOF'\n{PUBLISH_RESTART}EOF\n"
                     "/opt/teg-gateway/bin/python /root/publish.py")
        container.wait_until(lambda: "System is rebooting" in container.journal(), 30,
                             "the reboot command did not reboot")
        assert re.search(r"teg : .*USER=root ; COMMAND=(/usr)?/s?bin/reboot$",
                         container.journal(), re.MULTILINE)
    finally:
        container.remove()
        shutil.rmtree(workdir, ignore_errors=True)
