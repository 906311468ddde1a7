"""Controller versions on disk: names, directories, and the export from git.

Versions live in ``<data>/controller/versions/<version>/``: the process runtime runs the
command there when that directory exists, the Docker runtime builds its image from it,
and OTA unpacks packages into it. :class:`ControllerPlaces` gathers every place a runtime
uses, so a runtime does not need the whole settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from teg_gateway.config import Settings
from teg_gateway.controller.runtime import ControllerStartError
from teg_gateway.fsutil import fsync_dir

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_version(version: str) -> str:
    """``version`` when it is a safe name for a directory, a git ref and an image tag.

    Letters, digits and ``. _ + -``, starting with a letter or digit, at most 128
    characters, no ``..``. Raises ValueError otherwise.
    """
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or ".." in version:
        raise ValueError(f"controller version {version!r} is not allowed: use letters, digits "
                         "and . _ + - (starting with a letter or digit, at most 128, no '..')")
    return version


def versions_dir(settings: Settings) -> Path:
    """``<data>/controller/versions``: one directory per controller version."""
    return settings.data_dir / "controller" / "versions"


def version_dir(settings: Settings, version: str) -> Path:
    """The directory of one controller version (it may not exist)."""
    return versions_dir(settings) / check_version(version)


@dataclass(frozen=True)
class ControllerPlaces:
    """Where the controller lives: its data and logs directories (mounted into a
    container), the versions directory, and the git repository versions come from."""

    data_dir: Path
    logs_dir: Path
    versions_dir: Path
    git_repo: str = ""
    #: Docker build context and the Dockerfile inside it (``paths.controller_docker*``).
    docker_context: str = ""
    dockerfile: str = "./Dockerfile"

    @classmethod
    def of(cls, settings: Settings) -> ControllerPlaces:
        paths = settings.paths
        return cls(settings.controller_data_dir, settings.controller_logs_dir,
                   versions_dir(settings), paths.controller_git,
                   paths.controller_dockercontext, paths.controller_dockerfile)

    def version_dir(self, version: str) -> Path:
        """The directory of one controller version (it may not exist)."""
        return self.versions_dir / check_version(version)


async def run_git(repo: str, *args: str, timeout_s: float = 300.0) -> tuple[int, str, str]:
    """``git -C repo args…`` as an asyncio subprocess: (exit code, stdout, stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", "-C", repo, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise ControllerStartError(f"cannot run git: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ControllerStartError(f"git {args[0]} in {repo} took longer than "
                                   f"{timeout_s:.0f} s") from None
    code = proc.returncode if proc.returncode is not None else -1
    return code, out.decode(errors="replace"), err.decode(errors="replace")


async def export_version(settings: Settings, version: str, timeout_s: float = 300.0) -> Path:
    """``<data>/controller/versions/<version>``, exported from the controller git
    repository (``paths.controller_git``); see :func:`export_from_git`."""
    return await export_from_git(ControllerPlaces.of(settings), version, timeout_s)


async def export_from_git(places: ControllerPlaces, version: str,
                          timeout_s: float = 300.0) -> Path:
    """The directory of ``version``, exported from the controller git repository
    (``git archive`` of the tag or commit) when it does not exist yet.

    The repository's own working tree is never touched; a version missing from it is
    fetched (``git fetch --tags``) once. The export appears atomically (temp directory,
    rename), so a half-written version directory never exists.
    """
    dest = places.version_dir(version)
    if dest.is_dir():
        return dest
    repo = places.git_repo
    if not repo:
        raise ControllerStartError(
            f"no source for controller version {version}: {dest} does not exist and "
            "paths.controller_git (TEG_CONTROLLER_GIT_PATH) is not set")
    if not Path(repo).is_dir():
        raise ControllerStartError(f"controller git repository {repo} does not exist")
    ref = f"{version}^{{commit}}"
    code, out, _err = await run_git(repo, "rev-parse", "--verify", "--quiet", ref,
                                    timeout_s=timeout_s)
    if code != 0:
        log.info("controller version %s is not in %s: fetching", version, repo)
        _code, _out, err = await run_git(repo, "fetch", "--quiet", "--tags",
                                         timeout_s=timeout_s)
        if _code != 0:
            log.warning("git fetch in %s failed: %s", repo, err.strip()[:500])
        code, out, _err = await run_git(repo, "rev-parse", "--verify", "--quiet", ref,
                                        timeout_s=timeout_s)
    if code != 0:
        raise ControllerStartError(f"controller version {version} is neither a tag nor a "
                                   f"commit of the git repository {repo}")
    commit = out.strip()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{version}.tmp-{os.getpid()}"
    tar = dest.parent / f".{version}.tar-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        code, _out, err = await run_git(repo, "archive", "--format=tar", f"--output={tar}",
                                        commit, timeout_s=timeout_s)
        if code != 0:
            raise ControllerStartError(f"git archive of {version} failed: {err.strip()[:500]}")
        await asyncio.to_thread(_extract_tar, tar, tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tar.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("controller version %s (%s) exported to %s", version, commit[:12], dest)
    return dest


def _extract_tar(tar: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with tarfile.open(tar) as archive:
        archive.extractall(dest, filter="data")
