"""deploy/hardened/rnnstream.env started as a real rnnstream-server process, with certificates
and tokens made for the test where the file expects them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from rnnstream._connection import Connection
from rnnstream._health import check_health
from tests.conftest import MODELS, REPO
from tests.pki import ClientCert, Pki
from tests.server_process import free_port
from tests.tenants import Tenant

ENV_FILE = REPO / "deploy" / "hardened" / "rnnstream.env"
CONFIG_DIR = "/etc/rnnstream/"


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines, '#' comments, as systemd's EnvironmentFile and docker --env-file read
    the simple files this one is."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key.startswith("RNNSTREAM_"), line
            env[key] = value
    return env


class Credentials:
    """A tenant of the hardened server: a client certificate and a token for one principal."""

    def __init__(self, principal: str, cert: ClientCert, token: str) -> None:
        self.principal, self.cert, self.token = principal, cert, token


class HardenedServer:
    """The hardened configuration as a process; only listen addresses, ports, the model folder
    and the /etc/rnnstream prefix (to a temporary folder) differ from the file."""

    def __init__(self, tmp: Path, principals: tuple[str, ...], **overrides: str) -> None:
        self.pki = Pki(tmp)
        etc = tmp / "etc-rnnstream"
        (etc / "tls").mkdir(parents=True)
        (etc / "tls" / "server.pem").write_bytes(self.pki.cert_path.read_bytes())
        (etc / "tls" / "server.key").write_bytes(self.pki.key_path.read_bytes())
        (etc / "tls" / "clients-ca.pem").write_bytes(self.pki.ca)
        self.tenants = {
            p: Credentials(p, self.pki.client(p), f"{p}-{os.urandom(16).hex()}") for p in principals
        }
        tokens = "".join(f"{t.principal}={t.token}\n" for t in self.tenants.values())
        (etc / "tokens").write_text(tokens)
        self.metrics_token = os.urandom(16).hex()
        (etc / "metrics-token").write_text(self.metrics_token + "\n")
        env = {k: v.replace(CONFIG_DIR, f"{etc}/") for k, v in read_env_file().items()}
        self.port, self.metrics_port = free_port(), free_port()
        env.update(
            RNNSTREAM_HOST="127.0.0.1",
            RNNSTREAM_PORT=str(self.port),
            RNNSTREAM_METRICS_HOST="127.0.0.1",
            RNNSTREAM_METRICS_PORT=str(self.metrics_port),
            RNNSTREAM_MODEL_REPOSITORY=str(MODELS),
            **overrides,
        )
        self.env = env
        self.target = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rnnstream.server"],
            cwd=REPO,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = next(iter(self.tenants.values()))
        ready = check_health(self.connection(first), timeout=60)
        if not ready.ok:
            self.close()
            raise AssertionError(f"{ready.message}; stderr:\n" + "\n".join(self.lines))

    def connection(self, tenant: Credentials) -> Connection:
        folder = self.pki.folder / "clients"
        folder.mkdir(exist_ok=True)
        cert, key = tenant.cert.write(folder, tenant.principal)
        return Connection(
            self.target, tls_ca=self.pki.ca_path, tls_cert=cert, tls_key=key, token=tenant.token
        )

    def raw(self, principal: str, token: str | None = None) -> Tenant:
        """Raw stubs of both APIs with `principal`'s certificate and its token (or `token`)."""
        tenant = self.tenants[principal]
        return Tenant(self.target, tenant.cert.credentials(), token or tenant.token)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return self.process.returncode
