"""
Helpers for the SDK end-to-end tests: a test CA and server certificate, the
daemon with a plain and a TLS listener, the npm install, and running the
node scripts of this directory.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import pytest

from tests.daemon import Daemon

HERE = Path(__file__).resolve().parent
ENABLE = "MIXINGEST_SDK"
NODE_DIR = "MIXINGEST_SDK_NODE_DIR"
SECRET = "sdk-test-secret"
IMPORT_TOKEN = "sdk-import-token"
NPM_TIMEOUT = 300
WAIT = 15.0
"""Seconds an SDK's items get to arrive on the queue."""

_NETWORK_ERRORS = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH"
    r"|network request to .* failed|getaddrinfo|socket hang up",
    re.IGNORECASE,
)


class Certificate(NamedTuple):
    ca: Path
    cert: Path
    key: Path


def makeCertificate(directory: Path) -> Certificate:
    """
    A throwaway CA and a server certificate it signed for 127.0.0.1 and
    localhost, so that clients verify for real against the CA file.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=2)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mixingest SDK test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), critical=False
        )
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    paths = Certificate(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def itemToken(item: Dict[str, Any]) -> Any:
    props = item.get("properties")
    if isinstance(props, dict):
        return props.get("token")
    return item.get("$token")


class SDKDaemon(NamedTuple):
    """
    The real daemon with a plain and a TLS listener, C{/import} enabled for
    L{IMPORT_TOKEN} with L{SECRET}.
    """

    daemon: Daemon
    sslPort: int

    @property
    def http(self) -> str:
        return self.daemon.base

    @property
    def httpHost(self) -> str:
        return f"127.0.0.1:{self.daemon.port}"

    @property
    def httpsHost(self) -> str:
        return f"127.0.0.1:{self.sslPort}"

    def items(self, queue: str, token: str) -> List[Dict[str, Any]]:
        if not (self.daemon.dataDir / queue).is_dir():
            return []
        return [i for i in self.daemon.items(queue) if itemToken(i) == token]

    def waitFor(
        self, queue: str, token: str, count: int, timeout: float = WAIT
    ) -> List[Dict[str, Any]]:
        """
        The items of one token on one queue once at least C{count} have
        arrived; fails showing what did arrive after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.items(queue, token)
            if len(found) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(found) >= count, (
            f"{len(found)} of {count} {queue} items for {token} arrived:"
            f" {json.dumps(found, indent=1)[:4000]}\n--- daemon log:\n{self.daemon.log()[-3000:]}"
        )
        return found


def geoipArguments() -> List[str]:
    """
    C{--geoip} with the GeoLite2 City database of PyPI's
    C{maxminddb-geolite2} (a test extra), and C{--keep-ip} so that the
    addresses the SDKs send are still seen; nothing without the package.
    """
    try:
        from _maxminddb_geolite2 import geolite2_database
    except ImportError:
        return []
    return [f"--geoip={geolite2_database()}", "--keep-ip"]


def startDaemon(directory: Path, certificate: Certificate, sslPort: int) -> SDKDaemon:
    secrets = directory / "secrets.json"
    secrets.write_text(json.dumps({IMPORT_TOKEN: SECRET}))
    daemon = Daemon(
        directory,
        f"--listen=ssl:{sslPort}:privateKey={certificate.key}:certKey={certificate.cert}"
        ":interface=127.0.0.1",
        f"--import-secrets={secrets}",
        *geoipArguments(),
    ).start()
    return SDKDaemon(daemon, sslPort)


def requireTool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package}", pytrace=False)
    return path


def pinnedVersions() -> Dict[str, str]:
    return json.loads((HERE / "package.json").read_text())["dependencies"]


def installNodeModules() -> Path:
    """
    Install tests/sdk/package.json from the npm registry into a cache
    directory outside the repository (again whenever package.json changes);
    return the directory holding C{node_modules}.  Skips only when the
    registry cannot be reached.
    """
    requireTool("node", "nodejs")
    npm = requireTool("npm", "npm")
    manifest = (HERE / "package.json").read_bytes()
    digest = hashlib.sha256(manifest).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    target = Path(os.environ.get(NODE_DIR) or Path(cache) / "mixingest-sdk") / digest
    stamp = target / "node_modules" / ".mixingest-installed"
    if stamp.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    (target / "package.json").write_bytes(manifest)
    command = [
        npm,
        "install",
        "--no-audit",
        "--no-fund",
        "--no-package-lock",
        "--ignore-scripts",
        "--no-update-notifier",
    ]
    try:
        result = subprocess.run(
            command, cwd=target, capture_output=True, text=True, timeout=NPM_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm registry unreachable: npm install took over {NPM_TIMEOUT}s")
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if _NETWORK_ERRORS.search(output):
            why = [line for line in output.splitlines() if _NETWORK_ERRORS.search(line)]
            pytest.skip(f"npm registry unreachable, so the SDKs are not installed: {why[0][:300]}")
        pytest.fail(f"npm install failed in {target}:\n{output[-3000:]}", pytrace=False)
    for package, version in pinnedVersions().items():
        installed = installedVersion(target, package)
        assert installed == version, f"npm installed {package} {installed}, not {version}"
    stamp.write_text(digest)
    return target


def installedVersion(modules: Path, package: str) -> str:
    manifest = modules / "node_modules" / package / "package.json"
    return str(json.loads(manifest.read_text())["version"])


class NodeRunner(NamedTuple):
    modules: Path
    env: Dict[str, str]

    def run(self, script: str, config: Dict[str, Any], timeout: float = 120.0) -> Any:
        """
        Run one of this directory's node scripts with C{config} as its JSON
        argument; return the JSON object it printed last.
        """
        try:
            result = subprocess.run(
                ["node", str(HERE / script), json.dumps(config)],
                cwd=self.modules,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"{script} ran over {timeout}s:\n{e.stdout!r}\n{e.stderr!r}"
            ) from None
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert result.returncode == 0 and lines, (
            f"{script} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
        return json.loads(lines[-1])


def nodeEnvironment(modules: Path, ca: Optional[Path]) -> Dict[str, str]:
    """
    The environment for node: the cached modules, the test CA, and no proxy
    (all traffic stays on loopback).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and k != "NODE_OPTIONS"
    }
    env["NODE_PATH"] = str(modules / "node_modules")
    if ca is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(ca)
    return env
