"""Test certificates made on the spot with `cryptography`: a CA, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Certificates"]

Key = ec.EllipticCurvePrivateKey


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _sign(subject: str, key: Key, issuer: tuple[str, Key] | None, names: tuple[str, ...]) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if names:
        alternative: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
            for n in names
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_file(path: Path, key: Key) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


class Certificates:
    """PEM files in `folder`: ca.pem; server.pem/.key naming `server_names`; client.pem/.key."""

    def __init__(self, folder: Path, server_names: tuple[str, ...] = ("localhost", "127.0.0.1")):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        issuer = ("rnnstream test CA", ca_key)
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(_sign(issuer[0], ca_key, None, ()))
        server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = folder / "server.pem"
        self.server_cert.write_bytes(_sign("rnnstream server", server_key, issuer, server_names))
        self.server_key = _key_file(folder / "server.key", server_key)
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.client_cert = folder / "client.pem"
        self.client_cert.write_bytes(_sign("client-1", client_key, issuer, ()))
        self.client_key = _key_file(folder / "client.key", client_key)
