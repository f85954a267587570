"""Certificates made in the test: a CA, a server certificate for 127.0.0.1, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_NAME = "rnnstream test CA"


def _name(common: str | None) -> x509.Name:
    if common is None:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rnnstream tests")])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_cert(
    subject: str | None,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject or "", key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class ClientCert:
    """A client's certificate and key (PEM), and channel credentials that present them."""

    def __init__(self, cert: bytes, key: bytes, ca: bytes) -> None:
        self.cert, self.key, self._ca = cert, key, ca

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self._ca, self.key, self.cert)

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
        cert_path.write_bytes(self.cert)
        key_path.write_bytes(self.key)
        return cert_path, key_path


class Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and client certificates, as PEM;
    the CA, server certificate and key are also written to `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = pem(make_cert(CA_NAME, self._ca_key, None, ca=True))
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = make_cert(
            "localhost",
            server_key,
            (CA_NAME, self._ca_key),
            sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        client = self.client("client-1")
        self.client_cert, self.client_key = client.cert, client.key
        other_ca_key = ec.generate_private_key(ec.SECP256R1())
        stranger_key = ec.generate_private_key(ec.SECP256R1())
        stranger = make_cert("stranger", stranger_key, ("another CA", other_ca_key))
        self.stranger_cert, self.stranger_key = pem(stranger), key_pem(stranger_key)
        self.ca_path = folder / "ca.pem"
        self.cert_path = folder / "server.pem"
        self.key_path = folder / "server.key"
        self.ca_path.write_bytes(self.ca)
        self.cert_path.write_bytes(pem(server))
        self.key_path.write_bytes(key_pem(server_key))

    def client(
        self,
        common_name: str | None,
        *,
        dns: tuple[str, ...] = (),
        uri: tuple[str, ...] = (),
        email: tuple[str, ...] = (),
    ) -> ClientCert:
        """A client certificate this CA signed, with that subject CN (None: no CN) and SANs."""
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uri]
        sans += [x509.RFC822Name(e) for e in email]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = make_cert(common_name, key, (CA_NAME, self._ca_key), sans=sans)
        return ClientCert(pem(cert), key_pem(key), self.ca)

    def server_credentials(self) -> grpc.ChannelCredentials:
        """A channel that checks the server's certificate and presents none of its own."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca)
