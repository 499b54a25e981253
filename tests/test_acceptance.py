"""SPEC.md sentence by sentence, from outside: etl as a subprocess against the grader's own mock (tests/acceptmock.py)."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from acceptmock import CLIENT_ID, SECRET, Mock, config_text

from etlproc import Finished, etl_env, run_etl

BACKFILL = ("backfill", "--from", "2024-01-02", "--to", "2024-01-04")


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    grader = Mock()
    runner = await grader.serve()
    yield grader
    await runner.cleanup()


def workdir(tmp_path: Path, mock: Mock, **over: str) -> Path:
    (tmp_path / "config.toml").write_text(config_text(mock, f"sqlite:///{tmp_path}/etl.db", **over))
    return tmp_path


async def etl(directory: Path, *args: str, **env: str) -> Finished:
    """`python -m etl ARGS` run from `directory`, with the grader's secret unless env says otherwise."""
    environment = etl_env(**({"ETL_CLIENT_SECRET": SECRET} | env))
    environment = {k: v for k, v in environment.items() if v != "<unset>"}
    return await run_etl(*args, "--config", str(directory / "config.toml"), env=environment)


def rows(directory: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(directory / "etl.db") as db:
        return db.execute(sql).fetchall()


def leaked(mock: Mock, *texts: str) -> list[str]:
    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    return [s for s in [SECRET, basic, *mock.issued] if any(s in text for text in texts)]


async def test_backfill_half_open_in_utc_one_token_no_secret_anywhere(tmp_path: Path, mock: Mock) -> None:
    done = await etl(workdir(tmp_path, mock), "backfill", "--from", "2024-01-02T05:00:00", "--to", "2024-01-02T08:00:00+01:00")
    assert done.returncode == 0, done.stderr
    assert "2024-01-02T05:00:00Z" in done.stdout and "2024-01-02T07:00:00Z" in done.stdout
    assert rows(tmp_path, "SELECT id FROM orders ORDER BY id") == [(30,), (31,)]  # 05:00 in, 07:00 out
    assert len(mock.token_requests) == 1
    sent = mock.token_requests[0]
    assert sent["content_type"] == "application/x-www-form-urlencoded"
    assert sent["form"] == {"grant_type": "client_credentials", "scope": "legacy-api/read legacy-api/write"}
    assert sent["authorization"].startswith("Basic ")
    runs = json.dumps(rows(tmp_path, "SELECT * FROM etl_runs"), default=str)
    assert leaked(mock, done.stdout, done.stderr, runs, (tmp_path / "etl.db").read_bytes().decode("latin-1")) == []


async def test_body_client_auth_sends_the_credentials_as_form_fields(tmp_path: Path, mock: Mock) -> None:
    assert (await etl(workdir(tmp_path, mock, client_auth='"body"'), *BACKFILL)).returncode == 0
    sent = mock.token_requests[0]
    assert sent["authorization"] is None
    assert sent["form"]["client_id"] == CLIENT_ID and sent["form"]["client_secret"] == SECRET


async def test_one_token_for_eight_workers_and_a_401_gets_one_new_token(tmp_path: Path, mock: Mock) -> None:
    mock.delay_s, mock.revoke_first_token = 0.05, True
    done = await etl(workdir(tmp_path, mock, page_size="5"), "backfill", "--from", "2024-01-01", "--to", "2024-01-09")
    assert done.returncode == 0, done.stderr
    assert len(mock.token_requests) == 2 and mock.max_in_flight == 8
    assert rows(tmp_path, "SELECT count(*) FROM orders") == [(192,)]


async def test_a_crashed_backfill_resumes_and_restart_forgets(tmp_path: Path, mock: Mock) -> None:
    directory = workdir(tmp_path, mock)
    mock.fail_after = datetime(2024, 1, 3, tzinfo=UTC)
    assert (await etl(directory, *BACKFILL)).returncode == 1
    mock.fail_after = None
    finished = {start for (start,) in rows(tmp_path, "SELECT window_start FROM etl_windows WHERE state = 'done'")}
    mock.reset_counts()
    assert (await etl(directory, *BACKFILL)).returncode == 0
    fetched = {r["updated_since"] for r in mock.api_requests}
    assert "2024-01-03T00:00:00Z" in fetched
    assert not {start[:10] for start in finished} & {since[:10] for since in fetched}
    mock.reset_counts()
    assert (await etl(directory, *BACKFILL, "--restart")).returncode == 0
    assert len(mock.api_requests) == 6
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT id) FROM orders") == [(48, 48)]


@pytest.mark.parametrize(("situation", "code"), [("missing secret", 2), ("bad key", 2), ("invalid_client", 3), ("api 500", 1)])
async def test_exit_codes_and_json_logs(tmp_path: Path, mock: Mock, situation: str, code: int) -> None:
    over = {"concurrency": "8\nconcurency = 3"} if situation == "bad key" else {}
    env = {"ETL_CLIENT_SECRET": "<unset>"} if situation == "missing secret" else {}
    mock.token_error = "invalid_client" if situation == "invalid_client" else None
    mock.fail_after = datetime(2024, 1, 1, tzinfo=UTC) if situation == "api 500" else None
    done = await etl(workdir(tmp_path, mock, **over), "--log-format", "json", *BACKFILL, **env)
    assert done.returncode == code, done.stderr
    assert all(isinstance(json.loads(line), dict) for line in done.stderr.splitlines())
    if code == 2:
        assert mock.token_requests == [] and mock.api_requests == []


async def test_migrate_and_status_never_call_out_and_database_url_env_wins(tmp_path: Path, mock: Mock) -> None:
    directory = workdir(tmp_path, mock)
    other = tmp_path / "other.db"
    for command in ("migrate", "status"):
        done = await etl(directory, command, ETL_DATABASE_URL=f"sqlite:///{other}")
        assert done.returncode == 0, done.stderr
    assert other.exists() and not (tmp_path / "etl.db").exists()
    assert mock.token_requests == [] and mock.api_requests == []


async def test_sync_sends_its_date_bounds_in_whole_seconds(tmp_path: Path, mock: Mock) -> None:
    """A sync ends at now less lag, which went out as `updated_until=2026-11-25T18:40:35.738436Z`: an API that parses
    its bounds as yyyy-MM-dd'T'HH:mm:ss'Z' (Java's pattern, many gateways') answered 400 to every sync. The bounds
    are whole seconds now; the next sync starts where this one ended, so nothing falls between."""
    start = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    directory = workdir(tmp_path, mock, start=f'"{start}"')
    for _ in range(2):  # the first sync from start, the second from its end less lookback
        done = await etl(directory, "sync")
        assert done.returncode == 0, done.stderr
    bounds = [request[name] for request in mock.api_requests for name in ("updated_since", "updated_until")]
    assert bounds and all("." not in bound and bound.endswith("Z") for bound in bounds), bounds
