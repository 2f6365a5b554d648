"""A throwaway certificate authority and a server certificate signed by it, made with the
``openssl`` command line, for TLS tests against a local redis-server."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertificateAuthority:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str = "ca") -> CertificateAuthority:
    """A CA named ``name`` and a certificate for 127.0.0.1 and localhost that it signed."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=sharded-broker test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(ca_key), "-out", str(ca_cert),
    )
    key, request, cert = directory / f"{name}-server.key", directory / f"{name}-server.csr", directory / f"{name}-server.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(request))
    extensions = directory / f"{name}-server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )
    return CertificateAuthority(ca_cert, cert, key)


def tls_server_args(ca: CertificateAuthority, tls_port: int) -> list[str]:
    """redis-server arguments serving TLS on ``tls_port`` with ``ca``'s server certificate."""
    return [
        "--tls-port", str(tls_port), "--tls-cert-file", str(ca.server_cert), "--tls-key-file", str(ca.server_key),
        "--tls-ca-cert-file", str(ca.ca_cert), "--tls-auth-clients", "no",
    ]
