"""A throw-away PKI for the sandbox: a CA and a server certificate made with `openssl`.

The files are meant for a local broker in tests and demos only; the keys are
written unencrypted.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VALIDITY_DAYS = 3650

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.crt"
SERVER_KEY_NAME = "server.key"
UNTRUSTED_CA_CERT_NAME = "untrusted-ca.crt"
UNTRUSTED_CA_KEY_NAME = "untrusted-ca.key"


@dataclass(frozen=True)
class Pki:
    """Paths of a CA certificate and a server certificate/key signed by it."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_pki(
    directory: Path,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
) -> Pki:
    """Create (or reuse) a CA and a server certificate for `hostnames` and `ips` in `directory`.

    Existing files are reused when the CA certificate, server certificate and
    server key are all present; otherwise everything is generated afresh.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        directory=directory,
        ca_cert=directory / CA_CERT_NAME,
        server_cert=directory / SERVER_CERT_NAME,
        server_key=directory / SERVER_KEY_NAME,
    )
    if pki.ca_cert.is_file() and pki.server_cert.is_file() and pki.server_key.is_file():
        return pki
    if not hostnames and not ips:
        raise ValueError("a server certificate needs at least one host name or IP address")

    ca_key = directory / CA_KEY_NAME
    _make_ca(directory, ca_key, pki.ca_cert, "teg-gateway sandbox CA")

    common_name = hostnames[0] if hostnames else ips[0]
    alt_names = [f"DNS:{name}" for name in hostnames]
    alt_names += [f"IP:{ipaddress.ip_address(ip)}" for ip in ips]
    request_config = directory / "server-req.cnf"
    request_config.write_text(_request_config(common_name, extensions=None))
    extensions_config = directory / "server-ext.cnf"
    extensions_config.write_text(
        "[v3_server]\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = {', '.join(alt_names)}\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    csr = directory / "server.csr"
    _make_key(pki.server_key)
    _openssl(
        "req", "-new", "-config", str(request_config),
        "-key", str(pki.server_key), "-out", str(csr),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr),
        "-CA", str(pki.ca_cert), "-CAkey", str(ca_key),
        "-set_serial", _random_serial(), "-days", str(VALIDITY_DAYS), "-sha256",
        "-extfile", str(extensions_config), "-extensions", "v3_server",
        "-out", str(pki.server_cert),
    )  # fmt: skip
    for leftover in (csr, request_config, extensions_config):
        leftover.unlink(missing_ok=True)
    return pki


def make_untrusted_ca(directory: Path) -> Path:
    """Create (or reuse) a second CA, unrelated to `make_pki`'s; returns its certificate path.

    A client trusting only this CA must fail to verify the sandbox broker.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / UNTRUSTED_CA_CERT_NAME
    if not cert.is_file():
        _make_ca(directory, directory / UNTRUSTED_CA_KEY_NAME, cert, "teg-gateway untrusted CA")
    return cert


def _make_ca(directory: Path, key: Path, cert: Path, common_name: str) -> None:
    config = directory / f"{cert.stem}.cnf"
    config.write_text(_request_config(common_name, extensions="v3_ca"))
    _make_key(key)
    _openssl(
        "req", "-x509", "-new", "-config", str(config), "-key", str(key),
        "-days", str(VALIDITY_DAYS), "-sha256", "-set_serial", _random_serial(),
        "-out", str(cert),
    )  # fmt: skip
    config.unlink(missing_ok=True)


def _request_config(common_name: str, extensions: str | None) -> str:
    """A self-contained openssl config, so the system's openssl.cnf adds nothing."""
    text = "[req]\nprompt = no\ndistinguished_name = dn\n"
    if extensions:
        text += f"x509_extensions = {extensions}\n"
    text += f"[dn]\nCN = {common_name}\n"
    if extensions == "v3_ca":
        text += (
            "[v3_ca]\n"
            "basicConstraints = critical, CA:TRUE\n"
            "keyUsage = critical, keyCertSign, cRLSign\n"
            "subjectKeyIdentifier = hash\n"
        )
    return text


def _make_key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


def _random_serial() -> str:
    return "0x1" + secrets.token_hex(15)


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError(
            "the openssl command line tool is needed to make sandbox certificates; "
            "install it with `apt-get install -y openssl`"
        )
    result = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"openssl {args[0]} failed (exit {result.returncode}): {result.stderr.strip()}"
        )
