"""Optional TLS for control and data connections, and ``pccl gen-certs``.

A cluster shares one private CA: ``pccl gen-certs --out DIR`` writes ``ca.pem``, ``cert.pem``
and ``key.pem`` (ECDSA P-256, certificate signed by the CA, valid for the given host names and
addresses) with the ``cryptography`` package. The master serves TLS with ``--tls-cert/--tls-key``;
peers verify it against the CA and serve their p2p listener with the same certificate, requiring
a CA-signed client certificate from whoever dials them (mutual TLS). Host names are not checked
on p2p links (peers dial bare addresses); the CA chain is. TLS composes with the shared-token
HMAC handshake, which still runs inside the encrypted channel. Pure setup code; any thread.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSConfig", "add_arguments", "generate"]


@dataclass(frozen=True)
class TLSConfig:
    """Paths of the cluster CA and of this process's certificate and key."""

    ca: str
    cert: str
    key: str

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"TLS {name} file not found: {getattr(self, name)}")

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = False  # peers dial bare addresses; the CA chain is verified
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def generate(out: Path, hosts: list[str], days: int = 365) -> TLSConfig:
    """Write a CA and a CA-signed certificate/key for ``hosts`` into ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pccl cluster CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pccl node")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TLSConfig(str(out / "ca.pem"), str(out / "cert.pem"), str(key_path))


def add_arguments(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gen-certs", help="create a cluster CA and a certificate for TLS")
    p.add_argument("--out", required=True, help="directory for ca.pem, cert.pem, key.pem")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or address the certificate is valid for (repeatable; "
        "default: localhost, 127.0.0.1)",
    )
    p.add_argument("--days", type=int, default=365)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("--days must be >= 1")
        return 2
    cfg = generate(Path(args.out), args.host or ["localhost", "127.0.0.1"], args.days)
    print(f"wrote {cfg.ca}, {cfg.cert}, {cfg.key}")
    return 0
