"""
The README's recipe for several instances behind a proxy, proved with a real
nginx (Debian package nginx-light or nginx) on loopback in front of two
mixingest daemons that trust it through C{--trusted-proxy}.

The client connects from 127.0.0.2, nginx and the daemons talk over
127.0.0.1: so the address recorded for C{ip=1} can only be the client's if
it came from nginx's C{X-Forwarded-For}.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from base64 import b64encode
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tests.daemon import Daemon, freePort

CLIENT = "127.0.0.2"
PROXY = "127.0.0.1"

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream mixingest {{
        server 127.0.0.1:{first};
        server 127.0.0.1:{second};
        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 10m;
        location / {{
            proxy_pass http://mixingest;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def nginxBinary() -> str:
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )
    if path is None:
        pytest.skip("nginx not found: install it with `apt-get install -y nginx-light`")
    return path


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Tuple[int, List[Daemon]]]:
    """
    nginx on a free loopback port in front of two daemons.
    """
    binary = nginxBinary()
    daemons = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        daemons.append(Daemon(directory, f"--trusted-proxy={PROXY}/32", "--fsync=never"))
    nginxDir = tmp_path / "nginx"
    nginxDir.mkdir()
    port = freePort()
    user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
    process: Optional[subprocess.Popen] = None
    try:
        for daemon in daemons:
            daemon.start()
        # Only now are the daemons' ports final: start() moves to a new port
        # when the one it picked was taken before the daemon could bind it.
        (nginxDir / "nginx.conf").write_text(
            NGINX_CONF.format(
                user=user, dir=nginxDir, port=port, first=daemons[0].port, second=daemons[1].port
            )
        )
        process = subprocess.Popen(
            [
                binary,
                "-p",
                str(nginxDir),
                "-c",
                str(nginxDir / "nginx.conf"),
                "-e",
                str(nginxDir / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {process.returncode}:\n"
                    + (nginxDir / "error.log").read_text(errors="replace")
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port, daemons
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for daemon in daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.terminate()


def track(
    port: int, insertId: str, source: str = CLIENT, headers: Optional[Dict[str, str]] = None
) -> Tuple[int, bytes]:
    event = {"event": "Signed Up", "properties": {"token": "tok", "$insert_id": insertId}}
    data = b64encode(json.dumps(event).encode()).decode()
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    try:
        connection.request("GET", f"/track?ip=1&data={data}", headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_behindNginx(proxied: Tuple[int, List[Daemon]]) -> None:
    """
    Through nginx, every event lands on one of the two daemons (both get
    some) with the client's own address, even when the client sends an
    X-Forwarded-For of its own; straight to a daemon, a forged header is
    not believed.
    """
    port, daemons = proxied
    sent = {}
    for _ in range(20):
        insertId = uuid.uuid4().hex
        sent[insertId] = CLIENT
        assert track(port, insertId) == (200, b"1")
    forged = uuid.uuid4().hex
    sent[forged] = CLIENT
    assert track(port, forged, headers={"X-Forwarded-For": "6.6.6.6"}) == (200, b"1")
    direct = uuid.uuid4().hex
    sent[direct] = CLIENT
    assert track(daemons[0].port, direct, headers={"X-Forwarded-For": "6.6.6.6"}) == (200, b"1")

    for daemon in daemons:
        daemon.terminate()
    stored = [daemon.items() for daemon in daemons]
    assert all(len(items) > 1 for items in stored), [len(items) for items in stored]
    recorded = {
        item["properties"]["$insert_id"]: item["properties"]["ip"]
        for items in stored
        for item in items
    }
    assert recorded == sent
