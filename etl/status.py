"""`status`: what the database says about recent runs, watermarks, unfinished windows and rejects.

It reads etl's tables only: it never contacts the API or the token endpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from etl.db import HEAD_REVISION, database_error, missing_tables_error, newer_schema_error, schema_state
from etl.durations import isoformat_utc
from etl.locks import process_gone
from etl.schema import rejects, runs, watermarks, windows
from etl.store import cursor_from_text

RECENT_RUNS = 10


@dataclass
class StatusReport:
    revision: str | None
    head: str | None
    runs: list[dict[str, Any]]
    watermarks: list[dict[str, Any]]
    unfinished_windows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


async def read_status(engine: AsyncEngine) -> StatusReport:
    revision, missing = await schema_state(engine)
    if missing:
        raise missing_tables_error(missing, engine.url)
    if revision is None:
        return StatusReport(None, HEAD_REVISION, [], [], [], [])
    try:
        async with engine.connect() as connection:
            recent = await connection.execute(select(runs).order_by(runs.c.id.desc()).limit(RECENT_RUNS))
            marks = await connection.execute(select(watermarks).order_by(watermarks.c.resource))
            alive = await connection.execute(select(runs.c.id, runs.c.status, runs.c.host, runs.c.pid).where(runs.c.status == "running"))
            dead = [run.id for run in alive if _process_gone(run._asdict())]
            # a window "running" in the table whose run has ended (or was killed) was stopped mid-way: the next run takes it up
            ended = or_(runs.c.status != "running", runs.c.id.in_(dead))
            state = case((and_(windows.c.state == "running", ended), "stopped"), else_=windows.c.state)
            open_windows = await connection.execute(
                select(
                    windows.c.run_id, runs.c.command, runs.c.arguments, runs.c.status.label("run_status"),
                    windows.c.resource, windows.c.kind, state.label("state"), func.count().label("count"),
                    func.min(windows.c.window_start).label("first_start"), func.max(windows.c.window_end).label("last_end"),
                )
                .select_from(windows.outerjoin(runs, runs.c.id == windows.c.run_id))
                .where(windows.c.state.not_in(["done", "superseded"]))
                # by run: two backfills' windows in one line spanned both intervals and the gap between them
                .group_by(windows.c.run_id, runs.c.command, runs.c.arguments, runs.c.status, windows.c.resource, windows.c.kind, state)
                .order_by(windows.c.run_id, windows.c.resource, windows.c.kind, state)
            )
            reject_counts = await connection.execute(
                select(rejects.c.resource, func.count().label("count"), func.count(rejects.c.record_key.distinct()).label("keys"),
                       func.max(rejects.c.run_id).label("last_run"))
                .group_by(rejects.c.resource)
                .order_by(rejects.c.resource)
            )
            return StatusReport(
                revision,
                HEAD_REVISION,
                [dict(row._mapping) for row in recent],
                [dict(row._mapping) for row in marks],
                [_with_liveness(dict(row._mapping), dead) for row in open_windows],
                [dict(row._mapping) for row in reject_counts],
            )
    except DBAPIError as exc:
        raise database_error(exc, engine.url) from exc


def _with_liveness(group: dict[str, Any], dead: list[int]) -> dict[str, Any]:
    """Whether the run that holds these windows is at work on them now (its row says running, its process is there)."""
    return {**group, "run_alive": group["run_status"] == "running" and group["run_id"] not in dead}


def _when(value: Any) -> str:
    return isoformat_utc(value) if value is not None else "-"


def _future_note(watermark: str | None) -> str:
    """A highest cursor after now is a record the API stamped ahead of this machine's clock (bad data, its clock)."""
    cursor = cursor_from_text(watermark)
    if isinstance(cursor, datetime) and cursor > datetime.now(UTC):
        return " (in the future: the API stamped a record ahead of this machine's clock)"
    return ""


def _loaded(mark: dict[str, Any]) -> str:
    """How far a resource is loaded; one without date filters has no such point (every run reads it whole), only when
    its last full refresh finished: "loaded up to -" after every sync read as if nothing had ever loaded."""
    if mark["synced_until"] is None:
        return f"full refresh last finished {_when(mark['updated_at'])} (run #{mark['run_id']})"
    return f"loaded up to {_when(mark['synced_until'])}"


def _section(title: str, lines: list[str]) -> list[str]:
    return ["", title, *(lines or ["  none"])]


def _process_gone(run: dict[str, Any]) -> bool:
    """A run still 'running' whose process on this host no longer exists: killed (kill -9, OOM) or crashed."""
    return run["status"] == "running" and process_gone(run["host"], run["pid"])


def _run_line(run: dict[str, Any]) -> str:
    if _process_gone(run):
        run = {**run, "error": f"its process {run['pid']} on this host is gone (killed or crashed); "
                              "the next run of its resources marks it abandoned and continues its work"}
    line = (
        f"  #{run['id']:<5} {run['command']:<8} {run['status']:<11} started {_when(run['started_at'])}"
        f"  ended {_when(run['ended_at'])}  pages {run['pages']}  loaded {run['records_loaded']}"
        f"  rejected {run['records_rejected']}  token requests {run['token_requests']}"
    )
    flags = run_flags(run["command"], run["arguments"])
    line += f"\n         {flags}" if flags else ""
    return line + (f"\n         error: {run['error'].splitlines()[0]}" if run["error"] else "")


def run_flags(command: str, arguments: str) -> str:
    """The flags of a run as etl_runs keeps its arguments (JSON); the arguments as they are when they do not read."""
    try:
        return command_flags(command, json.loads(arguments))
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"arguments: {arguments}"


def command_flags(command: str, given: dict[str, Any]) -> str:
    """A backfill's interval as its flags: the same flags resume it (another --window plans other windows).

    Any run's `--resource`s too: a sync of one resource looked like a sync of all of them.
    """
    flags = [f"--from {given['from']}", f"--to {given['to']}"] if command == "backfill" else []
    flags += [f"--window {given['window']}"] if given.get("window") else []
    flags += [f"--resource {name}" for name in given.get("resources") or []]
    return " ".join(flags)


def _unfinished_lines(groups: list[dict[str, Any]]) -> list[str]:
    """Each run's unfinished windows, then the command that takes them up: at 3 a.m. the next step, not a puzzle."""
    lines: list[str] = []
    for run_id, of_run in groupby(groups, key=itemgetter("run_id")):  # read_status orders them by run
        own = list(of_run)
        lines += [
            f"  {group['resource']:<20} {group['kind']:<8} {group['state']:<8} {group['count']:>5}  {_span(group)}  (run #{run_id})"
            for group in own
        ]
        lines.append(f"    run #{run_id} is still running: it is loading them" if own[0]["run_alive"] else f"    next: {_resume_hint(own[0])}")
    return lines


def _span(group: dict[str, Any]) -> str:
    if group["first_start"] is None and group["last_end"] is None:
        return "full refresh"
    return f"from {_when(group['first_start'])} to {_when(group['last_end'])}"


def _resume_hint(group: dict[str, Any]) -> str:
    """A backfill's windows are taken up by the same backfill; a sync's (or a demo's) by the next run of that command."""
    if group["kind"] != "backfill":
        return f"the next `python -m etl {group['command'] or 'sync'}` takes them up"
    if group["command"] != "backfill":
        return "run the backfill of this interval again: finished windows are not fetched again"
    return f"python -m etl backfill {run_flags('backfill', group['arguments'])}"


def _revision_line(revision: str) -> str:
    """Whether the schema needs a step: "0002 (newest 0003)" left that to the reader, and 9999 read as a typo."""
    if revision == HEAD_REVISION:
        return f"schema revision {revision} (current)"
    if newer_schema_error(revision, "") is not None:
        return f"schema revision {revision}: a newer etl migrated it (this one knows up to {HEAD_REVISION}): run that etl here"
    return (f"schema revision {revision}, this etl's is {HEAD_REVISION}: run `python -m etl migrate` "
            "(a sync or backfill does it unless [database].auto_migrate = false)")


def format_status(report: StatusReport) -> str:
    if report.revision is None:
        return "etl's tables are not in this database yet: run `python -m etl migrate` or a first sync."
    lines = [_revision_line(report.revision), "(times are UTC)"]
    lines += _section("recent runs:", [_run_line(run) for run in report.runs])
    lines += _section("watermarks:", [
        f"  {mark['resource']:<20} highest cursor {mark['watermark'] or '-'}{_future_note(mark['watermark'])}  {_loaded(mark)}"
        for mark in report.watermarks
    ])
    lines += _section("unfinished windows:", _unfinished_lines(report.unfinished_windows))
    lines += _section("rejected records (etl_rejects):", [
        f"  {group['resource']:<20} {group['count']:>7}  ({group['keys']} distinct keys; latest in run #{group['last_run']})"
        for group in report.rejects
    ])
    return "\n".join(lines)
