"""HTTPS, as real registries and CDNs serve: a fetch and a resume over TLS through cuts.

The server is nginx with a self-signed certificate made by openssl; the child process
trusts it through SSL_CERT_FILE, as an operator with a private CA would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NginxFactory
from servers import free_port

from resumer.lab.proxy import FaultProxy, Faults

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _certificate(where: Path) -> tuple[Path, Path]:
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_fetch_over_tls_resumes_after_cuts_and_verifies(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    cert, key = _certificate(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(12_000_000)
    (www / "blob").write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    tls_port = free_port()
    nginx_factory(
        www,
        extra_server=(
            f"listen 127.0.0.1:{tls_port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};"
        ),
    )
    # Two connections cut mid-body (inside the TLS stream), then a clean one.
    faults = Faults(cut_at=(3_000_000, 5_000_000))
    async with FaultProxy("127.0.0.1", tls_port, faults, seed=1) as proxy:
        out = tmp_path / "out.bin"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "resumer",
            "fetch",
            f"https://127.0.0.1:{proxy.port}/blob",
            "--digest",
            digest,
            "-o",
            str(out),
            "--root",
            str(tmp_path / "root"),
            "--retry-delay",
            "0",
            "--progress",
            "plain",
            env={**os.environ, "SSL_CERT_FILE": str(cert)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    assert out.read_bytes() == data
    assert proxy.counters.cuts == 2
    text = stdout.decode()
    assert "Resuming from" in text
    # Resumed, not restarted: the payload crossed once, plus what each cut caught in
    # flight (TLS records and the client's socket buffer, which a reset discards unread;
    # 146 KB a cut was seen on a loaded machine). A restart would cost 3 MB or more.
    assert proxy.counters.bytes_down < 1.01 * len(data) + proxy.counters.cuts * 512 * 1024


def test_an_untrusted_certificate_is_a_clear_error(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    cert, key = _certificate(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    (www / "blob").write_bytes(b"x" * 1000)
    tls_port = free_port()
    nginx_factory(
        www,
        extra_server=(
            f"listen 127.0.0.1:{tls_port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};"
        ),
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "resumer",
            "fetch",
            f"https://127.0.0.1:{tls_port}/blob",
            "-o",
            str(tmp_path / "out"),
            "--root",
            str(tmp_path / "root"),
            "--max-download-attempts",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"},
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "certificate" in run.stderr.lower()
    assert not (tmp_path / "out").exists()
