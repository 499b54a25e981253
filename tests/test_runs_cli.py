"""sync and backfill as cron runs them: the real CLI in a subprocess against the simulator.

Covers issue 6: backfill ranges, resume after kill -9, the lock, SIGTERM,
terminal versus pipe output, JSON logs and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl

import orjson
import pytest
from loopback import silent_server

from etl.config import config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.pipeline import GRACE_SECONDS, Pipeline, ResourceStats
from etl.progress import LiveProgress, NoProgress, progress_for_terminal
from etl.records import RecordValidator
from etl.simulator import Faults, Simulator, SimulatorSettings
from etl.store import Store

import tomlwriter
from dbquery import rows, sqlite_rows
from etlproc import Finished, etl_env, finish, run_etl, start_etl, write_config

DAY = "2024-01-{:02d}"


def _settings(orders: int = 2000, delay_ms: int = 0) -> SimulatorSettings:
    return SimulatorSettings(counts={"orders": orders}, faults=Faults(delay_ms=delay_ms))


def _valid_keys(sim: Simulator, start: datetime | None = None, end: datetime | None = None) -> set[Any]:
    """Keys of the simulator's records in [start, end) that pass validation (the rest are rejects)."""
    document = demo_document(None, sim.base_url, sim.token_url)
    resource = config_from_document(document).resource("orders")
    records = list(sim.truth("orders", start, end).values())
    return {row["id"] for row in RecordValidator(resource).validate(records).rows}






def _window_fetches(sim: Simulator) -> dict[str, int]:
    """Successful page responses per window start (orders' updated_since)."""
    fetches: dict[str, int] = {}
    for key, count in sim.counters.as_dict()["page_fetches"].items():
        resource, _, query = key.partition("?")
        if resource == "orders":
            since = dict(parse_qsl(query)).get("updated_since", "")
            fetches[since] = fetches.get(since, 0) + count
    return fetches


async def test_backfill_of_a_sub_range_holds_exactly_that_range(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """`backfill --from 2024-01-03 --to 2024-01-05` loads those two days, nothing before or after, and says so."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings()) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        result = await run_etl("backfill", "--config", str(config), "--from", "2024-01-03", "--to", "2024-01-05")
        expected = _valid_keys(sim, datetime(2024, 1, 3, tzinfo=UTC), datetime(2024, 1, 5, tzinfo=UTC))

    assert result.returncode == 0, result.stderr
    assert "2024-01-03T00:00:00Z" in result.stdout and "2024-01-05T00:00:00Z" in result.stdout
    stored = {row[0] for row in sqlite_rows(url, "SELECT id FROM orders")}
    assert stored == expected
    bounds = sqlite_rows(url, "SELECT MIN(updated_at), MAX(updated_at) FROM orders")[0]
    assert bounds[0] >= "2024-01-03" and bounds[1] < "2024-01-05"


async def test_backfill_says_a_resource_without_date_filters_is_loaded_whole(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """It printed "backfill from 2024-01-03 to 2024-01-05" and read every product: an API without date filters
    cannot be asked for an interval, and a user backfilling two days of a large full-refresh resource was not told."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings()) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders", "products"])
        result = await run_etl("backfill", "--config", str(config), "--from", "2024-01-03", "--to", "2024-01-05")
        products = sim.settings.all_counts()["products"]

    assert result.returncode == 0, result.stderr
    announced = result.stdout.splitlines()[:2]
    assert "2024-01-03T00:00:00Z" in announced[0], result.stdout
    assert "products: no [resources.filter]" in announced[1] and "all of it" in announced[1], result.stdout
    assert "orders" not in announced[1]
    assert sqlite_rows(url, "SELECT COUNT(*) FROM products")[0][0] == products

async def test_a_dropped_table_is_loaded_again_from_start(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """`DROP TABLE orders` to reload it: etl created it again, empty, and the next sync went on from the watermark,
    exit 0 with 0 rows; a backfill of the range skipped every window as finished. A new table holds nothing, so
    the resource's watermark and windows are forgotten with it, and the next run loads from `start`."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings()) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        first = await run_etl("sync", "--config", str(config))
        loaded = sqlite_rows(url, "SELECT COUNT(*) FROM orders")[0][0]
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            connection.execute("DROP TABLE orders")
        again = await run_etl("sync", "--config", str(config))

    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert loaded > 0 and sqlite_rows(url, "SELECT COUNT(*) FROM orders")[0][0] == loaded
    assert "orders: its table 'orders' is new" in again.stderr

async def test_kill_9_mid_backfill_then_rerun_loses_nothing_and_refetches_no_finished_window(
    twenty_window_backfill: tuple[Simulator, str, tuple[str, ...]],
) -> None:
    """A 20-window backfill killed with SIGKILL, run again: every record present once, finished windows fetched once."""
    sim, url, args = twenty_window_backfill
    finished_before_kill, _ = await _signal_mid_backfill(args, url, signal.SIGKILL, at_least=5)
    done_at_kill = dict(sqlite_rows(url, "SELECT window_start, pages FROM etl_windows WHERE state = 'done'"))
    status = await run_etl("status", "--config", args[args.index("--config") + 1])
    assert "running" in status.stdout and "is gone (killed or crashed)" in status.stdout, status.stdout

    again = await run_etl(*args)
    fetches = _window_fetches(sim)
    expected = _valid_keys(sim)

    assert finished_before_kill >= 5 and len(done_at_kill) < 20
    assert again.returncode == 0, again.stderr
    stored = [row[0] for row in sqlite_rows(url, "SELECT id FROM orders")]
    assert len(stored) == len(set(stored)) and set(stored) == expected
    assert sqlite_rows(url, "SELECT COUNT(*) FROM etl_windows WHERE state = 'done'")[0][0] == 20
    # a window read again from its first page counts that reading only: the killed run's part of it was added before
    assert sqlite_rows(url, "SELECT SUM(records) FROM etl_windows")[0][0] == len(expected)
    for window_start, pages in done_at_kill.items():
        since = datetime.fromisoformat(window_start).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert fetches[since] == pages, f"window {since}, finished before the kill, was fetched again"


@pytest.fixture
async def twenty_window_backfill(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> AsyncIterator[tuple[Simulator, str, tuple[str, ...]]]:
    """A slow simulator, a fresh SQLite database, and the CLI arguments of a backfill of orders in
    20 windows of 12 h, slow enough to interrupt: some 60 pages at 120 ms, two at a time, so that work is
    left when the first commits show windows done (a stop after the last window is a finished run, exit 0)."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=6000, delay_ms=120)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"concurrency": 2})
        yield sim, url, ("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-01-11", "--window", "12h")


async def _signal_mid_backfill(args: tuple[str, ...], url: str, signum: int, at_least: int) -> tuple[int, Finished]:
    """Start the backfill, signal it once `at_least` windows are done; the windows done then, and how it ended."""
    process = await start_etl(*args)
    done = await _wait_for_done_windows(url, process, at_least)
    process.send_signal(signum)
    return done, await finish(process, timeout=30)


async def _wait_for_done_windows(url: str, process: asyncio.subprocess.Process, at_least: int) -> int:
    for _ in range(600):
        await asyncio.sleep(0.05)
        assert process.returncode is None, "the run ended before it could be killed"
        try:
            done = sqlite_rows(url, "SELECT COUNT(*) FROM etl_windows WHERE state = 'done'")[0][0]
        except sqlite3.OperationalError:
            continue
        if done >= at_least:
            return int(done)
    raise AssertionError("no window finished in 30 s")


async def _until_running(url: str, process: asyncio.subprocess.Process) -> None:
    """Until the run of `process` is recorded, so holds its lock, with most of its pages to go."""
    for _ in range(600):
        assert process.returncode is None, "the run ended before a second could meet its lock"
        with contextlib.suppress(Exception):  # the tables are not there yet
            if (await rows(url, "SELECT COUNT(*) FROM etl_runs WHERE status = 'running'"))[0][0]:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the run was not recorded within 30 s")


async def test_two_syncs_at_once_one_exits_4_naming_the_holder(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    """Two syncs on one database: one loads, the other exits 4 at once and says which run holds the lock."""
    async with Simulator(_settings(orders=4000, delay_ms=100)) as sim:  # a few seconds: a second run started under load meets it
        config = write_config(tmp_path, sim, sqlite_or_postgres_url, resources=["orders"], api={"concurrency": 2})
        first = await start_etl("sync", "--config", str(config))
        await _until_running(sqlite_or_postgres_url, first)  # not a fixed 1.5 s: under load the first had finished by then
        second = await run_etl("sync", "--config", str(config), timeout=30)
        first_result = await finish(first)

    assert first_result.returncode == 0, first_result.stderr
    assert second.returncode == 4
    assert "another run holds the lock for resource 'orders'" in second.stderr
    assert "run 1 (sync, pid" in second.stderr and "since 20" in second.stderr


async def test_runs_into_two_postgresql_schemas_of_one_database_do_not_lock_each_other(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The advisory lock was keyed by the resource alone: a sync into schema `b` (its own tables, watermarks and
    etl_runs) exited 4 while one ran into `a`, naming no holder, since `b`'s etl_runs had none."""
    url = await fresh_database("postgresql")
    engine = create_engine(url)
    async with engine.begin() as connection:
        for schema in ("a", "b"):
            await connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    await engine.dispose()
    async with Simulator(_settings(delay_ms=100)) as sim:
        configs = {}
        for schema in ("a", "b"):
            (tmp_path / schema).mkdir()
            schema_url = f"{url}?options=-csearch_path%3D{schema}"
            configs[schema] = write_config(tmp_path / schema, sim, schema_url, resources=["orders"], api={"concurrency": 2})
        first = await start_etl("sync", "--config", str(configs["a"]))
        await asyncio.sleep(1.5)
        same_schema = await run_etl("sync", "--config", str(configs["a"]), timeout=30)
        assert first.returncode is None, "the first run ended before the second schema's started"
        other_schema = await run_etl("sync", "--config", str(configs["b"]), timeout=60)
        first_result = await finish(first)
    assert first_result.returncode == 0, first_result.stderr
    assert other_schema.returncode == 0, other_schema.stderr
    assert same_schema.returncode == 4 and "run 1 (sync, pid" in same_schema.stderr, same_schema.stderr


async def test_sigterm_commits_what_is_in_flight_exits_1_and_the_next_run_completes(
    twenty_window_backfill: tuple[Simulator, str, tuple[str, ...]],
) -> None:
    """SIGTERM mid-run: exit 1, etl_runs says interrupted, and the next sync finishes the job."""
    sim, url, args = twenty_window_backfill
    _, stopped = await _signal_mid_backfill(args, url, signal.SIGTERM, at_least=3)
    status_after_stop = sqlite_rows(url, "SELECT status, error FROM etl_runs ORDER BY id")[-1]

    again = await run_etl(*args)
    expected = _valid_keys(sim)

    assert stopped.returncode == 1
    assert "SIGTERM received" in stopped.stderr
    assert status_after_stop[0] == "interrupted"
    assert again.returncode == 0, again.stderr
    assert {row[0] for row in sqlite_rows(url, "SELECT id FROM orders")} == expected


async def test_sigterm_cancels_requests_still_in_flight_after_the_grace_period(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A request that takes a minute (timeout_s = 120) held a SIGTERMed run until it came back: the grace never
    applied. It is now cancelled when the grace is over, with a warning naming the window cut short; what was
    committed stays, the run is `interrupted`, exit 1; a second signal is acknowledged, not silently ignored."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=20000, delay_ms=100)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"timeout_s": 120, "concurrency": 2})
        process = await start_etl("sync", "--config", str(config))
        try:
            await _wait_for_done_windows(url, process, at_least=1)
            sim.faults.delay_ms = 60_000
            await asyncio.sleep(1.5)  # the quick requests are answered and committed; only slow ones are in flight
            committed = sqlite_rows(url, "SELECT COUNT(*) FROM orders")[0][0]
            signalled = asyncio.get_running_loop().time()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1)
            process.send_signal(signal.SIGINT)
            stopped = await finish(process, timeout=GRACE_SECONDS + 10)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        seconds = asyncio.get_running_loop().time() - signalled

    assert stopped.returncode == 1, stopped.stderr
    assert GRACE_SECONDS - 1 < seconds < GRACE_SECONDS + 5, f"exit {seconds:.1f}s after SIGTERM"
    assert "SIGTERM received" in stopped.stderr
    assert "SIGINT received: already stopping" in stopped.stderr
    assert f"did not finish within the {GRACE_SECONDS:.0f}s grace period" in stopped.stderr
    assert "orders [20" in stopped.stderr, stopped.stderr  # the window cut short, by its bounds
    assert sqlite_rows(url, "SELECT status FROM etl_runs") == [("interrupted",)]
    assert 0 < committed <= sqlite_rows(url, "SELECT COUNT(*) FROM orders")[0][0]
    assert "— NOT FINISHED: the next run continues it" in stopped.stdout


async def test_a_stopped_backfill_says_the_same_backfill_continues_it(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """"NOT FINISHED: the next run continues it" sent the user to wait for the nightly sync, which does not take up
    a backfill's windows: the same backfill run again does, and the summary names its interval."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=20000, delay_ms=50)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"concurrency": 2})
        process = await start_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-03-01", "--window", "5d")
        await _wait_for_done_windows(url, process, at_least=1)
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process, timeout=GRACE_SECONDS + 10)
    assert stopped.returncode == 1, stopped.stderr
    assert "NOT FINISHED: the same backfill (--from 2024-01-01 --to 2024-03-01 --window 5d) run again continues it" in stopped.stdout
    assert "the same command run again continues from there" in stopped.stderr, stopped.stderr


CTRL_C_WHILE_LOADING = """
import sys

class _CtrlC:
    \"\"\"Ctrl-C lands while etl's modules load: the first import of etl.pipeline is interrupted.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "etl.pipeline":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _CtrlC())
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_ctrl_c_while_starting_is_one_log_line_and_exit_1(tmp_path: Path, log_format: str) -> None:
    """A Ctrl-C in the half second the imports take was a KeyboardInterrupt traceback and exit 130."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_WHILE_LOADING)
    environment = etl_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    result = await run_etl("--log-format", log_format, "status", env=environment)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "interrupted while starting" in result.stderr
    if log_format == "json":
        assert orjson.loads(result.stderr)["level"] == "error"


SIGTERM_WHILE_LOADING = """
import os, signal, sys

class _Sigterm:
    \"\"\"systemd or cron's timeout stops etl while its modules load: SIGTERM arrives during the import of etl.pipeline.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "etl.pipeline":
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, _Sigterm())
"""


async def test_sigterm_while_starting_is_exit_1_not_death_by_signal(tmp_path: Path) -> None:
    """SIGTERM before the run installs its handler killed the process outright: exit -15 and not a word."""
    (tmp_path / "sitecustomize.py").write_text(SIGTERM_WHILE_LOADING)
    environment = etl_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    result = await run_etl("sync", "--config", str(tmp_path / "missing.toml"), env=environment)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "interrupted while starting" in result.stderr


CTRL_C_THROUGH_AN_EXTENSION = """
import ctypes, sys

class _CtrlC:
    \"\"\"Ctrl-C lands while a C extension runs Python code in its import (PyRun_String): CPython marks itself to die by SIGINT.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "etl.pipeline":
            ctypes.pythonapi.PyRun_SimpleString(b"raise KeyboardInterrupt")
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _CtrlC())
"""


async def test_ctrl_c_while_an_extension_loads_is_exit_1_not_death_by_sigint(tmp_path: Path) -> None:
    """An outside probe saw 2 of 60 runs interrupted while starting log "interrupted while starting" and then
    die by SIGINT (exit -2): the interrupt had passed through an extension's import, and SystemExit(1) was ignored."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_THROUGH_AN_EXTENSION)
    environment = etl_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    result = await run_etl("status", env=environment)
    assert result.returncode == 1, result.stderr
    assert "interrupted while starting" in result.stderr


async def test_not_on_a_terminal_one_summary_line_per_resource(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """Through a pipe (cron): no progress bars, and one line per resource on stdout, nothing else (SPEC); the run's
    verdict was a sixth line there, and is a log line on stderr, which -q leaves out when the run succeeded."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = str(write_config(tmp_path, sim, url))
        result = await run_etl("sync", "--config", config)
        quiet = await run_etl("-q", "sync", "--config", config)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in lines] == ["orders", "customers", "events", "payments", "products"]
    assert "run 1 succeeded in" in result.stderr
    assert "━" not in result.stdout + result.stderr
    assert quiet.returncode == 0 and quiet.stderr == "" and len(quiet.stdout.strip().splitlines()) == 5, quiet.stderr


async def test_a_reader_that_went_away_costs_the_summary_not_the_exit_code(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """`etl sync | head -1` after head has exited: no traceback, exit 0, the rows are committed."""
    url = await fresh_database("sqlite")
    read_end, write_end = os.pipe()
    os.close(read_end)
    async with Simulator() as sim:
        process = await start_etl("sync", "--config", str(write_config(tmp_path, sim, url)), stdout=write_end)
        os.close(write_end)
        result = await finish(process)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert sqlite_rows(url, "SELECT count(*) FROM orders")[0][0] > 0


async def test_on_a_terminal_progress_bars_are_drawn(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """In a pseudo-terminal the run draws a live bar per resource with records and records/s."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(delay_ms=20)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders", "customers"])
        controller, terminal = pty.openpty()
        process = await start_etl("sync", "--config", str(config), stdout=terminal, stderr=terminal)
        os.close(terminal)
        screen = await _read_all(controller, process)
    assert process.returncode == 0, screen
    assert "━" in screen and "rec/s" in screen
    assert "orders" in screen and "customers" in screen


async def test_on_a_terminal_a_warning_is_printed_above_the_bars_not_into_them(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The log handler wrote to the real stderr under the live bars: the next redraw erased the warning
    and left a torn bar. Each line now comes after rich has cleared the bars (ESC[2K), then they are redrawn."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts={"orders": 2000}, faults=Faults(delay_ms=20, rate_503=0.2))) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"retry_backoff_s": 0.01})
        controller, terminal = pty.openpty()
        process = await start_etl("sync", "--config", str(config), stdout=terminal, stderr=terminal)
        os.close(terminal)
        screen = await _read_all(controller, process)
    assert process.returncode == 0, screen
    during_bars = screen[screen.index("━"):screen.index("orders: ")]
    warnings = [match.start() for match in re.finditer(r"\d{4}-\d\d-\d\dT[\d:]+Z WARNING +retrying", during_bars)]
    assert warnings, screen
    assert all(during_bars[:start].endswith("\x1b[2K") for start in warnings), screen


async def test_with_json_logs_a_terminal_gets_json_lines_and_no_bars(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """SPEC: with --log-format json every stderr line is one JSON object, on a terminal too, so no bars."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(delay_ms=20)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders", "customers"])
        controller, terminal = pty.openpty()
        process = await start_etl("--log-format", "json", "sync", "--config", str(config), stderr=terminal)
        os.close(terminal)
        screen = await _read_all(controller, process)
    assert process.returncode == 0, screen
    lines = [line for line in screen.split("\r\n") if line]
    assert lines and all(isinstance(orjson.loads(line), dict) for line in lines), screen
    assert "━" not in screen


def test_json_logs_choose_no_progress_display_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert isinstance(progress_for_terminal("text"), LiveProgress)
    assert isinstance(progress_for_terminal("json"), NoProgress)


async def _read_all(descriptor: int, process: asyncio.subprocess.Process) -> str:
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, descriptor, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    await process.wait()
    os.close(descriptor)
    return b"".join(chunks).decode(errors="replace")


async def test_json_logs_are_one_object_per_line_with_run_resource_and_window(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        result = await run_etl("--log-format", "json", "-v", "sync", "--config", str(config))
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line) for line in result.stderr.strip().splitlines()]
    assert events and all({"ts", "level", "message", "run_id", "resource", "window"} <= set(event) for event in events)
    assert any(event["resource"] == "orders" and event["window"] and event["run_id"] == 1 for event in events)
    # -v is for etl's own detail: aiosqlite logged every statement at DEBUG, ~200 lines per run
    foreign = [event for event in events if not event["logger"].startswith("etl") and event["level"] == "debug"]
    assert not foreign, foreign[:3]
    # and it shows etl's detail: each request and each commit (it printed nothing more than without -v)
    debug = [event["message"] for event in events if event["level"] == "debug"]
    assert any(re.fullmatch(r"GET http://127\.0\.0\.1:\d+/api/v1/orders\?.* -> 200, \d+ bytes in \d+ ms", line) for line in debug), debug[:5]
    assert any(line.startswith("committed ") for line in debug), debug[:5]


LIBRARY_WARNS_DURING_THE_RUN = """
import sys
import warnings

class _Warns:
    \"\"\"A library that warns while the run works: here, when etl.runs is first imported.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "etl.runs":
            warnings.warn("this library call is deprecated", UserWarning)
        return None

sys.meta_path.insert(0, _Warns())
"""


async def test_json_logs_carry_a_librarys_python_warning_as_one_object(tmp_path: Path) -> None:
    """warnings.warn wrote its two lines (place, then source line) straight to stderr, between the JSON objects."""
    (tmp_path / "sitecustomize.py").write_text(LIBRARY_WARNS_DURING_THE_RUN)
    environment = etl_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = await run_etl("--log-format", "json", "sync", "--resource", "nope", "--config", str(config), env=environment)
    assert result.returncode == 2, result.stderr
    events = [orjson.loads(line) for line in result.stderr.splitlines()]  # a bare warning line is not JSON
    assert any(event["level"] == "warning" and "this library call is deprecated" in event["message"] for event in events)


A_BUG_IN_PLANNING = """
import etl.planning

async def _bug(*args, **kwargs):
    raise RuntimeError("a bug in planning")

etl.planning.plan_sync = _bug  # etl.runs imports it from here
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_an_internal_error_is_logged_once_with_its_traceback_and_the_run_closed(
    tmp_path: Path, fresh_database: Callable[[str], Any], log_format: str
) -> None:
    """A bug escaped as Python's bare traceback: two dozen lines of plain text under --log-format json."""
    (tmp_path / "sitecustomize.py").write_text(A_BUG_IN_PLANNING)
    environment = etl_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        result = await run_etl("--log-format", log_format, "sync", "--config", str(config), env=environment)
    assert result.returncode == 1, result.stderr
    if log_format == "json":
        events = [orjson.loads(line) for line in result.stderr.splitlines()]  # a traceback line is not JSON
        errors = [event["message"] for event in events if event["level"] == "error"]
        assert len(errors) == 1 and errors[0].startswith("internal error: RuntimeError: a bug in planning"), errors
        assert "Traceback" in errors[0]
    else:
        assert "ERROR   internal error: RuntimeError: a bug in planning" in result.stderr
    assert sqlite_rows(url, "SELECT status, error FROM etl_runs") == [("failed", "internal error: RuntimeError: a bug in planning")]


async def test_status_shows_runs_watermarks_and_rejects_without_contacting_the_api(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], sync={"max_rejects": 1000})
        await run_etl("sync", "--config", str(config))
        await run_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-01-11")
        requests_before = sim.counters.api_requests + sim.counters.token_requests
        result = await run_etl("status", "--config", str(config))
        requests_after = sim.counters.api_requests + sim.counters.token_requests
    assert result.returncode == 0, result.stderr
    assert requests_after == requests_before
    assert "#1" in result.stdout and "succeeded" in result.stdout
    assert "orders" in result.stdout and "highest cursor 2024-01-1" in result.stdout
    # each run that reads a bad record rejects it again: status tells the rows from the records
    rejected, keys = sqlite_rows(url, "SELECT COUNT(*), COUNT(DISTINCT record_key) FROM etl_rejects")[0]
    assert 0 < keys < rejected
    assert f"{rejected}  ({keys} distinct keys; latest in run #2)" in result.stdout.split("rejected records")[1]


@pytest.mark.parametrize("flags", [("--from", "2024-01-05", "--to", "2024-01-01"), ("--from", "yesterday", "--to", "2024-01-01")])
async def test_backfill_with_a_bad_interval_is_exit_2(tmp_path: Path, flags: tuple[str, ...]) -> None:
    result = await run_etl("backfill", "--config", str(tmp_path / "absent.toml"), *flags, env=etl_env())
    assert result.returncode == 2 and "--from" in result.stderr


@pytest.mark.parametrize("window", ["0s", "PT0S", ""])
async def test_backfill_with_an_empty_window_is_exit_2(tmp_path: Path, window: str) -> None:
    """`--window 0s` must not fall back to the config's window as if the flag were absent."""
    flags = ("--from", "2024-01-01", "--to", "2024-01-02", "--window", window)
    result = await run_etl("backfill", "--config", str(tmp_path / "absent.toml"), *flags, env=etl_env())
    assert result.returncode == 2 and "--window" in result.stderr


@pytest.mark.parametrize("window", ["-1d", "-PT1H"])
async def test_a_negative_window_reaches_the_check_that_names_it(tmp_path: Path, window: str) -> None:
    """`--window -1d` was argparse's "expected one argument" (it read -1d as an option); `--window=-1d` was not."""
    flags = ("--from", "2024-01-01", "--to", "2024-01-02", "--window", window)
    result = await run_etl("backfill", "--config", str(tmp_path / "absent.toml"), *flags, env=etl_env())
    assert result.returncode == 2, result.stderr
    assert f"--window: '{window}' is not a duration" in result.stderr
    assert "expected one argument" not in result.stderr


@pytest.mark.parametrize(("flags", "named"), [
    (("--from", "2024-01-01", "--to", "9999-12-31T23:00:00-05:00"), "--to"),
    (("--from", "0001-01-01T00:00:00+01:00", "--to", "2024-01-01"), "--from"),
    (("--from", "9999-12-01", "--to", "9999-12-31", "--window", "60d"), "--to"),
    (("--from", "2024-01-01", "--to", "9999-12-31T23:59:59Z", "--resource", "payments"), "--to"),
    (("--from", "0001-01-01", "--to", "2024-01-01", "--resource", "customers"), "--from"),
])
async def test_an_interval_at_the_calendars_edge_is_exit_2_naming_the_flag(
    tmp_path: Path, flags: tuple[str, ...], named: str
) -> None:
    """`--to 9999-12-31` ("forever") was a traceback, exit 1: its last window, or the UTC form of an offset, passed the
    year 9999, the last a datetime holds; so did a `--from` in year 1 that a filter's step or an offset moved before it."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    document["resources"][1]["filter"]["from_inclusive"] = False  # customers: `from` is one step before the window
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = await run_etl("backfill", "--config", str(config), *flags, env=etl_env())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and f"ERROR   {named}" in result.stderr and "9999" in result.stderr
    assert "backfill from" not in result.stdout  # refused before it announces an interval it will not load
    assert not (tmp_path / "etl.db").exists()


async def test_a_backfill_that_starts_in_the_future_says_so(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """`--from 2062-01-01` (for 2026) loaded nothing and succeeded, saying only that the watermark stops at now less lag."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=50)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        result = await run_etl("backfill", "--config", str(config), "--from", "2062-01-01", "--to", "2062-01-03")
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "--from 2062-01-01T00:00:00Z is in the future" in result.stderr


async def test_a_window_that_would_cut_the_interval_into_millions_is_exit_2(tmp_path: Path) -> None:
    """`--window 1s` over a year would plan 31 million windows (and rows of etl_windows) before the first request."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    flags = ("--from", "2023-01-01", "--to", "2024-01-01", "--resource", "orders", "--window", "1s")
    result = await run_etl("backfill", "--config", str(config), *flags, env=etl_env())
    assert result.returncode == 2, result.stderr
    assert "--window" in result.stderr and "31,536,000" in result.stderr
    assert not (tmp_path / "etl.db").exists()  # refused before the run is recorded: no windows, no run


async def test_a_backfill_and_a_sync_on_other_resources_run_at_once(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    """The lock is per resource: a backfill of orders and a sync of customers on one database both succeed."""
    async with Simulator(_settings(orders=8000, delay_ms=150)) as sim:
        config = write_config(tmp_path, sim, sqlite_or_postgres_url, resources=["orders", "customers"], api={"concurrency": 2})
        backfill = await start_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-01-11", "--resource", "orders")
        await asyncio.sleep(1.0)
        sync = await run_etl("sync", "--config", str(config), "--resource", "customers")
        overlapping = backfill.returncode is None  # the backfill was still running when the sync ended
        backfilled = await finish(backfill)
    assert sync.returncode == 0, sync.stderr
    assert backfilled.returncode == 0, backfilled.stderr
    assert overlapping
    runs = await rows(sqlite_or_postgres_url, "SELECT command, status FROM etl_runs ORDER BY id")
    assert sorted(tuple(run) for run in runs) == [("backfill", "succeeded"), ("sync", "succeeded")]


async def test_sync_windows_left_by_an_interrupted_sync_are_superseded_by_the_next(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A sync stopped mid-way leaves unfinished windows; the next sync covers them, and status no longer lists them."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=20000, delay_ms=80)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"concurrency": 2}, sync={"max_rejects": 1000})
        process = await start_etl("sync", "--config", str(config))
        await asyncio.sleep(2.5)
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process)
        unfinished_after_stop = sqlite_rows(url, "SELECT COUNT(*) FROM etl_windows WHERE state NOT IN ('done', 'superseded')")[0][0]
        again = await run_etl("sync", "--config", str(config))
        status = await run_etl("status", "--config", str(config))
    assert stopped.returncode == 1 and unfinished_after_stop > 0
    assert again.returncode == 0, again.stderr
    assert sqlite_rows(url, "SELECT COUNT(*) FROM etl_windows WHERE state NOT IN ('done', 'superseded')")[0][0] == 0
    assert "unfinished windows:\n  none" in status.stdout


async def test_a_sync_stopped_mid_way_is_continued_not_started_again(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A cursor sync stopped a third of the way through its one large window, then another: the second takes up
    the stopped one's windows instead of planning afresh (which fetched every page again), skips those that
    finished, and reads the window it was in again from its first page: a cursor may be an offset in disguise,
    and resuming at it lost a record updated meanwhile (tests/test_reliability.py)."""
    url, whole_url = await fresh_database("sqlite"), await fresh_database("sqlite")
    (tmp_path / "whole").mkdir()
    async with Simulator(SimulatorSettings(counts={"events": 6000}, faults=Faults(delay_ms=5))) as sim:
        config = write_config(tmp_path, sim, url, resources=["events"], api={"concurrency": 2}, sync={"max_rejects": 1000})
        process = await start_etl("sync", "--config", str(config))
        while sim.counters.pages_served.get("events", 0) < 30:
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process)
        before = sim.counters.pages_served["events"]
        again = await run_etl("sync", "--config", str(config))
        continued = sim.counters.pages_served["events"] - before
        whole = await run_etl("sync", "--config", str(write_config(tmp_path / "whole", sim, whole_url, resources=["events"],
                                                                    sync={"max_rejects": 1000})))
        one_sync = sim.counters.pages_served["events"] - before - continued
    assert stopped.returncode == 1 and again.returncode == 0 and whole.returncode == 0, again.stderr
    assert 6000 / 100 <= continued < one_sync, f"continued: {continued} pages; one whole sync: {one_sync}"
    loaded, rejected = (sqlite_rows(url, query)[0][0] for query in ("SELECT COUNT(*) FROM events", "SELECT COUNT(DISTINCT raw) FROM etl_rejects"))
    assert loaded + rejected == len(sim.truth("events"))


async def test_status_after_a_stopped_backfill_says_stopped_and_how_to_resume(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """The windows of a backfill stopped mid-way were listed as "running" long after its run ended, and nothing
    said which --from/--to/--window would resume it (another --window plans other windows and reads all again)."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=6000, delay_ms=40)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"concurrency": 2}, sync={"max_rejects": 1000})
        process = await start_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-01-11", "--window", "2d")
        while sim.counters.pages_served.get("orders", 0) < 10:
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process)
        status = await run_etl("status", "--config", str(config))
    assert stopped.returncode == 1
    unfinished = status.stdout.split("unfinished windows:")[1].split("rejected records")[0]
    assert "backfill stopped" in unfinished and "running" not in unfinished, status.stdout
    assert "--from 2024-01-01T00:00:00Z --to 2024-01-11T00:00:00Z --window 2d\n" in status.stdout
    assert json.loads(sqlite_rows(url, "SELECT arguments FROM etl_runs")[0][0])["window"] == "2d"


async def test_status_after_a_kill_9_mid_window_says_stopped_not_running(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """The windows a killed run was in the middle of were listed as "running" (its run never recorded its end),
    which reads as a run still at work: they are stopped, and the next run takes them up."""
    url = await fresh_database("sqlite")
    async with Simulator(_settings(orders=6000, delay_ms=40)) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"concurrency": 2}, sync={"max_rejects": 1000})
        process = await start_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-01-11", "--window", "5d")
        for _ in range(600):
            await asyncio.sleep(0.05)
            with contextlib.suppress(sqlite3.OperationalError):
                if sqlite_rows(url, "SELECT COUNT(*) FROM etl_windows WHERE state = 'running' AND pages > 0")[0][0]:
                    break
        process.send_signal(signal.SIGKILL)
        await finish(process)
        status = await run_etl("status", "--config", str(config))
    unfinished = status.stdout.split("unfinished windows:")[1].split("rejected records")[0]
    assert "backfill stopped" in unfinished and "running" not in unfinished, status.stdout


async def test_sigterm_cuts_short_a_wait_before_a_retry(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """An API answering 429 with Retry-After: 30 held a stopped run in its waits for minutes; the stop must end them."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts={"orders": 500}, faults=Faults(rate_429=1.0, retry_after_s=30))) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        process = await start_etl("sync", "--config", str(config))
        while not sim.counters.api_status.get(429):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # into the wait
        signalled = asyncio.get_running_loop().time()
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process)
        seconds = asyncio.get_running_loop().time() - signalled
    assert stopped.returncode == 1, stopped.stderr
    assert seconds < 10, f"exit {seconds:.1f}s after SIGTERM"
    assert sqlite_rows(url, "SELECT status FROM etl_runs") == [("interrupted",)]


async def test_no_retry_is_announced_once_a_stop_was_asked_for(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """After "SIGTERM received: finishing the requests in flight", answers that came back 429 still logged
    "retrying in 1.0s (attempt 2 of 7)", which read as if the run went on; no retry follows a stop."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts={"orders": 2000}, faults=Faults(rate_429=0.5, retry_after_s=1, delay_ms=300))) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        process = await start_etl("sync", "--config", str(config))
        while not sim.counters.api_status.get(429):
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process)
    after_stop = stopped.stderr.split("SIGTERM", 1)[-1]
    assert "SIGTERM" in stopped.stderr, stopped.stderr
    assert "retrying in" not in after_stop, after_stop


@pytest.mark.parametrize("from_env", [False, True], ids=["config", "env"])
async def test_status_on_a_sqlite_file_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path, from_env: bool) -> None:
    """status on a mistyped SQLite path created an empty file and said "etl's tables are not in this database yet", exit 0."""
    document = demo_document({"url": "sqlite:///typo.db"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    missing = tmp_path / ("env.db" if from_env else "typo.db")
    env = etl_env(ETL_DATABASE_URL=f"sqlite:///{missing}") if from_env else etl_env()
    result = await run_etl("status", "--config", str(config), env=env)
    assert result.returncode == 1, result.stderr
    assert f"there is no database file at {missing}" in result.stderr
    assert ("check $ETL_DATABASE_URL" if from_env else "check [database].url") in result.stderr
    assert "no run has happened yet" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.toml"]


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://"])
@pytest.mark.parametrize("command", ["sync", "migrate", "status"])
async def test_a_sqlite_url_without_a_file_is_exit_2(tmp_path: Path, url: str, command: str) -> None:
    """`sqlite:///$DB_FILE` with the variable unset is `sqlite:///`, in memory: a sync "succeeded" and kept nothing."""
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, "sqlite:///etl.db", resources=["orders"])
        result = await run_etl(command, "--config", str(config), env=etl_env(ETL_DATABASE_URL=url))
        requests = sim.counters.api_requests + sim.counters.token_requests
    assert result.returncode == 2, result.stderr
    assert "$ETL_DATABASE_URL" in result.stderr and "names no database file" in result.stderr
    assert requests == 0


async def test_sqlite_memory_asked_for_by_name_runs_with_a_warning(tmp_path: Path) -> None:
    """`:memory:` is a deliberate trial run: it loads, and says that nothing is kept."""
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, "sqlite:///etl.db", resources=["orders"])
        result = await run_etl("sync", "--config", str(config), env=etl_env(ETL_DATABASE_URL="sqlite:///:memory:"))
    assert result.returncode == 0, result.stderr
    assert "gone when etl exits" in result.stderr


async def test_status_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    """`etl status | head -1`: the reader leaves before etl writes; stderr must not fill with a BrokenPipeError traceback."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    assert (await run_etl("migrate", "--config", str(config))).returncode == 0  # a database for status to report on
    reader, writer = os.pipe()
    os.close(reader)
    try:
        process = await start_etl("status", "--config", str(config), stdout=writer, env=etl_env())
    finally:
        os.close(writer)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()


def _config_for(tmp_path: Path, database_url: str, base_url: str) -> Path:
    """A user's config.toml: the demo's document with their API's URL and their database."""
    document = demo_document({"url": database_url}, base_url, "https://auth.example.com/oauth2/token")
    return tomlwriter.write(tmp_path / "config.toml", document)


async def test_demo_loads_the_simulator_into_the_configured_database(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """README's first command: the bundled simulator, a sync into [database].url, one summary line per resource."""
    url = await fresh_database("sqlite")
    config = _config_for(tmp_path, url, "http://127.0.0.1:8765/api/v1")
    result = await run_etl("demo", "--config", str(config), env=etl_env())
    assert result.returncode == 0, result.stderr
    assert "demo: simulator on http://127.0.0.1:" in result.stdout and "orders:" in result.stdout
    assert [tuple(row) for row in await rows(url, "SELECT command, status FROM etl_runs")] == [("demo", "succeeded")]
    assert (await rows(url, "SELECT COUNT(*) FROM orders"))[0][0] > 0


async def test_demo_refuses_a_database_that_a_real_api_fills(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """With a production config in the working directory, a demo would have mixed fake orders into real ones
    and moved the watermark to now, so that the next sync skipped all history: it refuses, exit 2, naming the key."""
    url = await fresh_database("sqlite")
    config = _config_for(tmp_path, url, "https://legacy.example.com/api/v1")
    assert (await run_etl("migrate", "--config", str(config), env=etl_env())).returncode == 0
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        connection.execute(
            "INSERT INTO etl_runs (command, arguments, resources, status, started_at, pages, records_fetched, records_loaded, "
            "records_rejected, requests, retries, token_requests, host, pid) VALUES ('sync', '{}', 'orders', 'succeeded', '2026-01-01', 0, 0, 0, 0, 0, 0, 0, 'h', 1)"
        )

    result = await run_etl("demo", "--config", str(config), env=etl_env())

    assert result.returncode == 2, result.stderr
    assert "database.url" in result.stderr and "ETL_DATABASE_URL=sqlite:///demo.db" in result.stderr
    assert [tuple(row) for row in await rows(url, "SELECT command FROM etl_runs")] == [("sync",)]


@pytest.mark.parametrize("named_by", ["--config", "$ETL_CONFIG"])
async def test_demo_with_a_named_config_that_does_not_exist_is_exit_2(tmp_path: Path, named_by: str) -> None:
    """A typo in --config or $ETL_CONFIG sent the demo, exit 0, into ./etl.db instead of the database the user meant."""
    missing = tmp_path / "nowhere" / "prod.toml"
    flags = ("--config", str(missing)) if named_by == "--config" else ()
    env = etl_env(ETL_CONFIG=str(missing)) if named_by == "$ETL_CONFIG" else etl_env()
    result = await finish(await start_etl("demo", *flags, env=env, cwd=tmp_path), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"config file {missing} not found" in result.stderr
    assert "demo: simulator on" not in result.stdout
    assert not (tmp_path / "etl.db").exists()


async def test_demo_without_any_config_loads_into_etl_db_in_the_working_directory(tmp_path: Path) -> None:
    """README's first command, in a directory with no config.toml and no $ETL_CONFIG: the demo's own defaults."""
    result = await finish(await start_etl("demo", env=etl_env(), cwd=tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"loading into sqlite:///{tmp_path / 'etl.db'}" in result.stdout
    assert sqlite_rows(f"sqlite:///{tmp_path / 'etl.db'}", "SELECT COUNT(*) FROM orders")[0][0] > 0


async def test_a_second_demo_says_why_it_loads_almost_nothing(tmp_path: Path) -> None:
    """A newcomer who runs the demo twice saw "orders: 0 loaded" for most resources and no word why: the first
    demo moved their watermarks to now. The second says so, and how to see a first run again."""
    first = await finish(await start_etl("demo", env=etl_env(), cwd=tmp_path), timeout=120)
    assert first.returncode == 0, first.stderr
    assert "earlier run" not in first.stdout
    second = await finish(await start_etl("demo", env=etl_env(), cwd=tmp_path), timeout=120)
    assert second.returncode == 0, second.stderr
    assert "orders: 0 loaded" in second.stdout
    assert "this database holds an earlier run" in second.stdout.strip().splitlines()[-1], second.stdout  # after the summary
    assert f"delete {tmp_path / 'etl.db'}" in second.stdout, second.stdout


async def test_status_after_a_demo_without_a_config_file_needs_only_the_database(tmp_path: Path) -> None:
    """The demo needs no config file, but `status` then had none to read and said only 'config.toml not found'."""
    assert (await finish(await start_etl("demo", env=etl_env(), cwd=tmp_path), timeout=120)).returncode == 0
    refused = await finish(await start_etl("status", env=etl_env(), cwd=tmp_path), timeout=60)
    assert refused.returncode == 2
    assert "config.toml" in refused.stderr and "$ETL_DATABASE_URL will do" in refused.stderr
    result = await finish(await start_etl("status", env=etl_env(ETL_DATABASE_URL="sqlite:///etl.db"), cwd=tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "demo     succeeded" in result.stdout


async def test_a_named_config_that_does_not_exist_stays_exit_2_for_status_with_a_database_url(tmp_path: Path) -> None:
    """$ETL_DATABASE_URL stands in only for a config no one named: a mistyped --config is still an error."""
    env = etl_env(ETL_DATABASE_URL=f"sqlite:///{tmp_path / 'etl.db'}")
    result = await run_etl("status", "--config", str(tmp_path / "typo.toml"), env=env)
    assert result.returncode == 2 and "typo.toml" in result.stderr


@pytest.mark.parametrize(("windows_done", "status"), [(3, "succeeded"), (2, "interrupted")])
def test_a_stop_after_the_last_window_finished_is_a_finished_run(windows_done: int, status: str) -> None:
    """A SIGTERM that arrived as the last window finished was recorded 'interrupted' with exit 1, everything loaded."""
    document = demo_document({"url": "sqlite:///unused.db"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    stop = asyncio.Event()
    stop.set()
    pipeline = Pipeline(config_from_document(document), cast(Store, None), 1, stop, NoProgress())
    pipeline.stats = {"orders": ResourceStats("orders", windows=3, windows_done=windows_done)}
    assert pipeline._outcome(1.0).status == status


async def test_status_shows_each_unfinished_backfill_apart_with_the_command_that_resumes_it(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """Two failed backfills of one resource were one line spanning both intervals, with no word of how to resume them."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"max_retries": 0})
        sim.faults.update({"outage": True})
        for start, end in (("2024-01-01", "2024-01-03"), ("2024-01-07", "2024-01-09")):
            failed = await run_etl("backfill", "--config", str(config), "--from", start, "--to", end)
            assert failed.returncode != 0
        result = await run_etl("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    unfinished = result.stdout.split("unfinished windows:")[1].split("rejected records")[0]
    assert "from 2024-01-01T00:00:00Z to 2024-01-09T00:00:00Z" not in unfinished
    assert "python -m etl backfill --from 2024-01-01T00:00:00Z --to 2024-01-03T00:00:00Z" in unfinished
    assert "python -m etl backfill --from 2024-01-07T00:00:00Z --to 2024-01-09T00:00:00Z" in unfinished


async def test_status_says_when_a_full_refresh_last_finished_and_names_an_unfinished_one(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A resource without date filters showed "highest cursor -  loaded up to -" after every sync, as if nothing had
    ever loaded, and its unfinished window "from - to -"."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["products"], api={"max_retries": 0})
        loaded = await run_etl("sync", "--config", str(config))
        sim.faults.update({"outage": True})
        failed = await run_etl("sync", "--config", str(config))
        result = await run_etl("status", "--config", str(config))
    assert loaded.returncode == 0 and failed.returncode == 1, loaded.stderr + failed.stderr
    assert result.returncode == 0, result.stderr
    finished = sqlite_rows(url, "SELECT updated_at FROM etl_watermarks WHERE resource = 'products'")[0][0]
    marks = result.stdout.split("watermarks:")[1].split("unfinished windows:")[0]
    assert "loaded up to -" not in marks
    assert f"full refresh last finished {finished[:19].replace(' ', 'T')}" in marks, marks
    assert "(run #1)" in marks
    unfinished = result.stdout.split("unfinished windows:")[1].split("rejected records")[0]
    assert "from - to -" not in unfinished and "full refresh" in unfinished, unfinished


@pytest.mark.parametrize(("revision", "said"), [("0002", "run `python -m etl migrate`"), ("9999", "a newer etl migrated")])
async def test_status_of_a_schema_not_at_this_etls_revision_says_what_that_means(
    tmp_path: Path, fresh_database: Callable[[str], Any], revision: str, said: str
) -> None:
    """`schema revision 0002 (newest 0003)` left the reader to guess whether to act; 9999 (newest 0003) read as a typo."""
    url = await fresh_database("sqlite")
    env = etl_env(ETL_DATABASE_URL=url)
    assert (await finish(await start_etl("migrate", env=env, cwd=str(tmp_path)))).returncode == 0
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        connection.execute("UPDATE etl_alembic_version SET version_num = ?", (revision,))
    result = await finish(await start_etl("status", env=env, cwd=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert said in result.stdout.splitlines()[0]


async def test_a_second_version_row_of_a_newer_etl_is_named_not_a_traceback(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A row '9999' inserted beside '0003' (a newer etl's, or a branch of its migrations): migrate, sync and status ended
    in SQLAlchemy's MultipleResultsFound traceback, and check too."""
    url = await fresh_database("sqlite")
    env = etl_env(ETL_DATABASE_URL=url)
    assert (await finish(await start_etl("migrate", env=env, cwd=str(tmp_path)))).returncode == 0
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        connection.execute("INSERT INTO etl_alembic_version (version_num) VALUES ('9999')")
    migrated = await finish(await start_etl("migrate", env=env, cwd=str(tmp_path)))
    status = await finish(await start_etl("status", env=env, cwd=str(tmp_path)))
    assert migrated.returncode == 1 and "Traceback" not in migrated.stderr, migrated.stderr
    assert "revision 9999" in migrated.stderr and "a newer etl migrated them" in migrated.stderr
    assert status.returncode == 0, status.stderr
    assert "a newer etl migrated it" in status.stdout.splitlines()[0]


async def test_sync_after_etl_windows_was_dropped_by_hand_creates_it_again_and_loads(tmp_path: Path, simulator: Simulator) -> None:
    """sync ended in "internal error: OperationalError: no such table: etl_windows" with SQLAlchemy's traceback on
    every run, migrate said "already current", and status failed on it without a word of what to do."""
    url = f"sqlite:///{tmp_path / 'etl.db'}"
    config = str(write_config(tmp_path, simulator, url, resources=["products"]))
    assert (await run_etl("sync", "--config", config)).returncode == 0
    with sqlite3.connect(tmp_path / "etl.db") as connection:
        connection.execute("DROP TABLE etl_windows")
    connection.close()
    status = await run_etl("status", "--config", config)
    synced = await run_etl("sync", "--config", config)
    assert status.returncode == 1 and "etl_windows" in status.stderr and "python -m etl migrate" in status.stderr, status.stderr
    assert synced.returncode == 0, synced.stderr
    assert "etl_windows" in synced.stderr and "created again" in synced.stderr and "Traceback" not in synced.stderr
    assert (await run_etl("status", "--config", config)).returncode == 0


async def test_status_leaves_a_sqlite_database_etl_never_touched_byte_for_byte_as_it_was(tmp_path: Path) -> None:
    """status switched any SQLite file it opened to WAL, for good: a write to another program's database."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    before = path.read_bytes()
    result = await finish(await start_etl("status", env=etl_env(ETL_DATABASE_URL=f"sqlite:///{path}"), cwd=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "not in this database yet" in result.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
async def test_sigterm_while_the_database_does_not_answer_stops_at_once(tmp_path: Path, scheme: str) -> None:
    """A stop before loading begins (connecting, taking the lock, migrating) went unheeded: against a database that
    hung, a SIGTERMed run waited out asyncpg's 60 s connect timeout, and against MySQL for ever (aiomysql has no
    timeout on its handshake), and the second signal promised a 15 s grace it did not keep. It ends at once now."""
    async with silent_server() as (port, connected):
        document = demo_document({"url": f"{scheme}://root@127.0.0.1:{port}/x"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
        config = tomlwriter.write(tmp_path / "config.toml", document)
        process = await start_etl("sync", "--config", str(config))
        try:
            await asyncio.wait_for(connected.wait(), 30)
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            stopped = await finish(process, timeout=10)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert stopped.returncode == 1, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert "nothing was loaded" in stopped.stderr and "the same command run again" in stopped.stderr, stopped.stderr
