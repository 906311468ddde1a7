"""Download of an OTA package from ``sw_url`` (a package stored outside ThingsBoard).

Streamed to the ``.part`` file the chunked download uses, resumed with an HTTP range
request after a broken connection or a gateway restart, TLS verified against the
system's CAs (plus ``[ota] url_ca_cert``); plain http only with ``[ota] allow_http``, or
(for the local bus, where thin-edge.io's file-transfer service lives) to a loopback
address.
A refusal by the server (4xx) fails the update; anything else (no network, 5xx, a cut
connection) is tried again with backoff for as long as the version is wanted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from teg_gateway.backoff import Backoff
from teg_gateway.bounds import clip

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
FSYNC_EVERY_BYTES = 1024 * 1024


class DownloadError(Exception):
    """The package cannot be downloaded (the message says why); not worth retrying."""


class _Retry(Exception):
    """A failure worth trying again."""


class _Superseded(Exception):
    """Another version became wanted during the download."""


def is_loopback(host: str | None) -> bool:
    """``host`` is a loopback address written as such (127.0.0.0/8, ::1); a name is not
    (it could resolve to anything)."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_http: bool, loopback_http: bool = False,
              what: str = "sw_url") -> None:
    """DownloadError unless ``url`` is https (or http when allowed, or with
    ``loopback_http`` http to a loopback address) with a host."""
    parts = urlsplit(url)
    if loopback_http and not allow_http and parts.scheme == "http" and parts.hostname:
        if is_loopback(parts.hostname):
            return
        raise DownloadError(f"{what} {clip(repr(url))}: plain http is allowed only to a "
                            "loopback address (127.0.0.0/8, ::1); use https")
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        allowed = " or ".join(schemes)
        hint = "" if allow_http or parts.scheme != "http" else \
            " (plain http needs [ota] allow_http = true)"
        raise DownloadError(f"{what} {clip(repr(url))} is not an {allowed} URL{hint}")


#: Redirects followed for one request; each hop obeys the rules of the first URL.
MAX_REDIRECTS = 5


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that :func:`check_url` accepts (https, or http
    when allowed), and at most MAX_REDIRECTS times; anything else is a DownloadError.
    Every hop goes through the same opener, so it is verified with the same CAs."""

    # urllib's own loop limits stay above ours, so the clearer message is ours.
    max_repeats = max_redirections = MAX_REDIRECTS + 1

    def __init__(self, allow_http: bool, loopback_http: bool = False) -> None:
        self.allow_http = allow_http
        self.loopback_http = loopback_http

    def redirect_request(  # noqa: PLR0917 (the signature urllib calls)
            self, req: urllib.request.Request, fp: Any, code: int, msg: str,
            headers: Any, newurl: str) -> urllib.request.Request | None:
        hops = sum(getattr(req, "redirect_dict", {}).values())
        if hops >= MAX_REDIRECTS:
            raise DownloadError(f"sw_url redirected more than {MAX_REDIRECTS} times "
                                f"(last to {clip(newurl)})")
        try:
            check_url(newurl, self.allow_http, self.loopback_http)
        except DownloadError as exc:
            raise DownloadError(f"sw_url {clip(req.full_url)} redirected: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def opener(context: ssl.SSLContext, allow_http: bool,
           loopback_http: bool = False) -> urllib.request.OpenerDirector:
    """The URL opener of a download: TLS with ``context``, checked redirects."""
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                       _CheckedRedirects(allow_http, loopback_http))


def tls_context(extra_ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if extra_ca:
        context.load_verify_locations(cafile=extra_ca)
    return context


@dataclass
class UrlDownload:
    """Fetches ``url`` into ``part``; :meth:`run` returns False when ``superseded()``
    became true meanwhile (the download is abandoned)."""

    url: str
    part: Path
    size: int | None
    max_bytes: int
    context: ssl.SSLContext
    timeout_s: float
    superseded: Callable[[], bool]
    allow_http: bool = False
    #: plain http to a loopback address (the local bus's file-transfer service)
    loopback_http: bool = False
    backoff: Backoff = field(default_factory=lambda: Backoff(1.0, 60.0))

    async def run(self) -> bool:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        while True:
            if self.superseded():
                return False
            try:
                if await self._attempt():
                    return True
            except _Superseded:
                return False
            except _Retry as exc:
                delay = self.backoff.next_delay()
                log.warning("download from %s: %s; trying again in %.1f s",
                            self.url, exc, delay)
                await asyncio.sleep(delay)

    async def _attempt(self) -> bool:
        """One request, continuing the partial file; True when it is complete."""
        have = self.part.stat().st_size if self.part.exists() else 0
        if self.size is not None and have > self.size:
            self.part.unlink()
            have = 0
        if self.size is not None and have == self.size and have > 0:
            return True
        request = urllib.request.Request(self.url, headers={"Accept-Encoding": "identity"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response: HTTPResponse = await asyncio.to_thread(
                opener(self.context, self.allow_http, self.loopback_http).open, request,
                timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have and self.size is None:
                return True  # asked past the end: the file was complete
            if 300 <= exc.code < 500:  # a refusal, or a redirect that cannot be followed
                raise DownloadError(f"the server refused {clip(self.url)}: HTTP {exc.code} "
                                    f"{clip(exc.reason)}") from None
            raise _Retry(f"HTTP {exc.code} {clip(exc.reason)}") from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise DownloadError(f"the TLS certificate of {clip(self.url)} does not verify: "
                                    f"{reason.verify_message}") from None
            raise _Retry(clip(reason, 500)) from None
        with response:
            if have and response.status != 206:
                log.info("%s does not resume downloads: starting again from byte 0", self.url)
                have = 0
            length = response.getheader("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            if self.size is not None and total is not None and total != self.size:
                raise DownloadError(f"{clip(self.url)} has {total} bytes, sw_size announced "
                                    f"{self.size}")
            if (total or 0) > self.max_bytes:
                raise DownloadError(f"package of {total} bytes is larger than [ota] "
                                    f"max_package_bytes ({self.max_bytes})")
            have = await self._copy(response, have)
        if total is not None and have < total:
            raise _Retry(f"the connection ended after {have} of {total} bytes")
        if self.size is not None and have != self.size:
            raise _Retry(f"received {have} bytes, sw_size announced {self.size}")
        self.backoff.reset()
        return True

    async def _copy(self, response: HTTPResponse, offset: int) -> int:
        """Append the body to the part file from ``offset``; the new length."""
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT, 0o644)
        unsynced = 0
        try:
            os.ftruncate(fd, offset)
            while True:
                if self.superseded():
                    raise _Superseded
                try:
                    data = await asyncio.to_thread(response.read, BLOCK)
                except (OSError, ValueError, HTTPException) as exc:
                    raise _Retry(f"the connection broke at byte {offset}: {exc!r}") from None
                if not data:
                    break
                if offset + len(data) > self.max_bytes:
                    raise DownloadError(f"package larger than [ota] max_package_bytes "
                                        f"({self.max_bytes})")
                os.pwrite(fd, data, offset)
                offset += len(data)
                unsynced += len(data)
                if unsynced >= FSYNC_EVERY_BYTES:
                    await asyncio.to_thread(os.fsync, fd)
                    unsynced = 0
        finally:
            await asyncio.to_thread(os.fsync, fd)
            os.close(fd)
        return offset
