"""Invariant 6: no secrets at rest.

Authorization header values, the query string of the URL asked for and of every
redirected (pre-signed) URL never reach state.db or its WAL, the logs (the library's at
DEBUG, the CLI's ``-v`` stderr) or the progress output (``--progress json``), on success
and on failure alike. Every attempt below fails in a way whose error text names the URL
it was talking to, so a leak has every chance to show.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from badserver import Behaviour, stall, status
from test_helpers_core import (
    TokenSource,
    attempt_rows,
    blob_and_digest,
    bytes_at_rest,
    open_engine,
    run_cli_child,
    serve,
)

from resumer.errors import BudgetExhaustedError
from resumer.transfer import BlobRequest

SIZE = 150_000
DATA, DIGEST = blob_and_digest(SIZE, seed=4)
N = 50_000

SECRETS = ("AUTHSECRET", "ORIGINSECRET", "REDIRECTSECRET", "CREDSECRET", "X-Amz-Signature")


def dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signed(base: str) -> str:
    return f"{base}/b?X-Amz-Signature=REDIRECTSECRET&X-Amz-Credential=CREDSECRET"


def leaks(blob: bytes | str) -> list[str]:
    if isinstance(blob, str):
        blob = blob.encode()
    return [s for s in SECRETS if s.encode() in blob]


async def test_library_keeps_tokens_and_signed_urls_out_of_the_database_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "root"
    async with (
        serve({"b": DATA}, [stall(N), Behaviour("wrong-range"), status(500)]) as storage,
        serve({"b": DATA}) as origin,
    ):
        origin.script = [
            status(401),  # refresh the token once
            Behaviour("redirect", location=signed(f"http://127.0.0.1:{dead_port()}")),
            *[Behaviour("redirect", location=signed(storage.url))] * 4,
        ]
        source = TokenSource(f"{origin.url}/b?access=ORIGINSECRET", prefix="AUTHSECRET")
        async with open_engine(root, max_download_attempts=6) as eng:
            result = await eng.transfers.fetch(BlobRequest(DIGEST, source, digest=DIGEST))
            assert result.path.read_bytes() == DATA
            rows = await attempt_rows(eng)
            # The WAL holds the latest transactions while the engine is open.
            open_bytes = bytes_at_rest(root)
            assert (root / "state.db-wal").exists()
        # Every failure kind that names a URL happened, so the test can catch a leak.
        errors = " ".join(r.error or "" for r in rows)
        assert "Content-Range" in errors and "500" in errors and "stalled" in errors
        assert len(rows) == 6
        # The credentials really were used, and the redirects really were signed.
        assert origin.requests[0].headers["Authorization"] == "Bearer AUTHSECRET-1"
        assert origin.requests[1].headers["Authorization"] == "Bearer AUTHSECRET-2"
    assert leaks(open_bytes) == []
    assert leaks(bytes_at_rest(root)) == []
    assert leaks(caplog.text) == []
    assert leaks(" ".join(str(r.args) for r in caplog.records)) == []
    assert caplog.records, "nothing was logged: the test would prove nothing"


async def test_a_failed_fetch_keeps_secrets_out_of_its_error_and_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "root"
    async with serve({"b": DATA}, [stall(N), status(503)]) as storage, serve({"b": DATA}) as origin:
        origin.script = [Behaviour("redirect", location=signed(storage.url))] * 2
        async with open_engine(root, max_download_attempts=2) as eng:
            with pytest.raises(BudgetExhaustedError) as info:
                await eng.fetch(
                    f"{origin.url}/b?access=ORIGINSECRET",
                    digest=DIGEST,
                    dest=tmp_path / "out",
                    headers={"Authorization": "AUTHSECRET"},
                )
            row = await eng.store.transfer(DIGEST)
    assert row is not None and row.last_error and "503" in row.last_error
    assert leaks(row.last_error) == []
    assert leaks(str(info.value)) == [] and "503" in str(info.value)
    assert leaks(bytes_at_rest(root)) == []
    assert leaks(caplog.text) == []


@pytest.mark.parametrize("succeeds", [True, False], ids=["success", "budget-exhausted"])
async def test_cli_verbose_log_and_json_progress_hold_no_secrets(
    tmp_path: Path, succeeds: bool
) -> None:
    root = tmp_path / "root"
    script = [stall(N), Behaviour("wrong-range"), status(500)]
    async with serve({"b": DATA}, script) as storage, serve({"b": DATA}) as origin:
        origin.script = [
            Behaviour("redirect", location=signed(f"http://127.0.0.1:{dead_port()}")),
            *[Behaviour("redirect", location=signed(storage.url))] * 4,
        ]
        attempts = "5" if succeeds else "4"
        code, out, err = await run_cli_child(
            "fetch",
            f"{origin.url}/b?access=ORIGINSECRET",
            "--digest",
            DIGEST,
            "-o",
            str(tmp_path / "out"),
            "--root",
            str(root),
            "-v",
            "--progress",
            "json",
            "--max-download-attempts",
            attempts,
            "--retry-delay",
            "0",
            "--stall-timeout",
            "0.3",
        )
    assert code == (0 if succeeds else 1), err
    # The output is rich enough to leak: progress lines, log lines naming each failure.
    assert '"Resuming from' in out and "Content-Range" in err and "500" in err
    if not succeeds:
        assert '"errorDetail"' in out
    assert leaks(out) == []
    assert leaks(err) == []
    assert leaks(bytes_at_rest(root)) == []
