"""`sync` and `backfill` from start to end: lock, migrate, record the run, plan, load, record the outcome.

The order matters: the secret and `ca_bundle` are checked before anything is
contacted or recorded (exit 2), the lock is taken before anything is written
(exit 4), and the run's row in etl_runs is always closed with its outcome,
whatever happened between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import SecretStr

from etl.config import Config, ResourceConfig
from etl.db import create_engine, require_lasting
from etl.durations import format_duration, isoformat_utc
from etl.errors import EtlError, Interrupted
from etl.locks import ResourceLocks
from etl.logs import redact, run_id_var
from etl.pipeline import Pipeline, RunOutcome
from etl.planning import ResourcePlan, plan_backfill, plan_sync
from etl.progress import ProgressDisplay
from etl.status import run_flags
from etl.store import Store
from etl.transport import require_ca_bundle

log = logging.getLogger(__name__)

T = TypeVar("T")
PlanOne = Callable[[Store, ResourceConfig, int], Awaitable[ResourcePlan]]


def select_resources(config: Config, names: list[str] | None) -> list[ResourceConfig]:
    """The named resources (each checked to exist), or all of them, in config order."""
    if not names:
        return list(config.resources)
    wanted = {config.resource(name).name for name in names}
    return [resource for resource in config.resources if resource.name in wanted]


async def sync(
    config: Config,
    names: list[str] | None,
    stop: asyncio.Event,
    progress: ProgressDisplay,
    secret: SecretStr | None = None,
    command: str = "sync",
) -> RunOutcome:
    """`command` is what etl_runs records: "demo" for the demo's sync, so that a later demo can tell its own database."""
    now = datetime.now(UTC)

    def plan(store: Store, resource: ResourceConfig, run_id: int) -> Awaitable[ResourcePlan]:
        return plan_sync(store, resource, run_id, now, config.sync.lag)

    return await execute(config, command, {"resources": names or []}, select_resources(config, names), plan, stop, progress, secret)


async def backfill(
    config: Config,
    start: datetime,
    end: datetime,
    names: list[str] | None,
    window: timedelta | None,
    restart: bool,
    stop: asyncio.Event,
    progress: ProgressDisplay,
) -> RunOutcome:
    now = datetime.now(UTC)
    settled = now - config.sync.lag
    if start > now:
        log.warning("--from %s is in the future: there is nothing to load there yet (check its year)", isoformat_utc(start))
    elif end > settled:
        log.info("the interval ends after now less [sync].lag (%s): the watermark moves no further than that, "
                 "so the next sync reads the rest again", isoformat_utc(settled))

    def plan(store: Store, resource: ResourceConfig, run_id: int) -> Awaitable[ResourcePlan]:
        return plan_backfill(store, resource, run_id, start, end, window, restart, now, config.sync.lag)

    resources = select_resources(config, names)
    arguments = {"from": isoformat_utc(start), "to": isoformat_utc(end), "resources": names or [],
                 "window": format_duration(window) if window else "", "restart": restart}
    return await execute(config, "backfill", arguments, resources, plan, stop, progress)


async def execute(
    config: Config,
    command: str,
    arguments: dict[str, Any],
    resources: list[ResourceConfig],
    plan_one: PlanOne,
    stop: asyncio.Event,
    progress: ProgressDisplay,
    secret: SecretStr | None = None,
) -> RunOutcome:
    secret = secret or config.client_secret()
    require_ca_bundle(config.api)
    names = [resource.name for resource in resources]
    require_lasting(config.database.url)
    engine = create_engine(config.database.url)
    locks = ResourceLocks(engine, names)
    try:
        await _unless_stopped(stop, locks.acquire())
        try:
            store = Store(engine)
            await store.prepare(resources, config.database.auto_migrate)  # not given up: MySQL's DDL is not transactional
            run_id = await store.start_run(command, arguments, names)
            run_id_var.set(run_id)
            log.info("run %d: %s of %s", run_id, command, ", ".join(names))
            _report_abandoned(await store.mark_abandoned(names, run_id))
            return await _run_recorded(config, store, run_id, resources, plan_one, stop, progress, secret)
        finally:
            await locks.release()
    finally:
        await engine.dispose()


async def _unless_stopped(stop: asyncio.Event, step: Awaitable[T]) -> T:
    """`step` (connecting, the lock), given up as soon as a signal sets `stop`. A migration is not: cut off
    half-way, MySQL would keep the DDL it had done without Alembic's record of it.

    Nothing is loaded or recorded yet, so nothing is lost: a stop used to wait for the step, which against a database
    that does not answer was asyncpg's 60 s connect timeout, and for ever on MySQL, whose handshake has no timeout.
    """
    task = asyncio.ensure_future(step)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # its transaction rolled back, its locks released
    if task.cancelled() and stop.is_set():
        raise Interrupted("interrupted before loading began; nothing was loaded, and the same command run again starts it")
    return task.result()


def _report_abandoned(dead: list[Any]) -> None:
    """A re-run after a kill -9 (or OOM, or a reboot) said nothing of the run it took over: at 3 a.m. the killed
    run's work looked lost, and the new one like a fresh start rather than the resumption it is."""
    for run in dead:
        log.warning("run %d (%s, pid %s on %s, started %s) ended without recording its end (killed or crashed): "
                    "what it committed is kept, and running the same command again takes up its unfinished windows",
                    run.id, " ".join(filter(None, [run.command, run_flags(run.command, run.arguments)])), run.pid, run.host, isoformat_utc(run.started_at))


async def _run_recorded(
    config: Config,
    store: Store,
    run_id: int,
    resources: list[ResourceConfig],
    plan_one: PlanOne,
    stop: asyncio.Event,
    progress: ProgressDisplay,
    secret: SecretStr,
) -> RunOutcome:
    """Plan and load, and close the run's row with the truth whatever happens."""
    pipeline = Pipeline(config, store, run_id, stop, progress)
    try:
        plans = [await plan_one(store, resource, run_id) for resource in resources]
        outcome = await pipeline.run(plans, secret)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt) else "failed"
        message = str(exc) if isinstance(exc, EtlError) else redact(f"internal error: {type(exc).__name__}: {exc}")
        await asyncio.shield(store.finish_run(run_id, status, _counts(pipeline), message))
        raise
    await asyncio.shield(store.finish_run(run_id, outcome.status, _counts(pipeline), run_error(outcome)))
    return outcome


def run_error(outcome: RunOutcome) -> str | None:
    """etl_runs' error: each failed resource and why, on the first line (the one `status` shows), then the hint.

    The run's error alone is the first one met: a second resource failing for its own reason went unrecorded, and an
    API path unlike the resource's name did not say which resource it was.
    """
    if outcome.error is None:
        return None
    failed: dict[str, list[str]] = {}
    for stats in outcome.resources.values():
        if stats.error:
            failed.setdefault(stats.error, []).append(stats.name)
    if outcome.error.message not in failed:  # an interruption, too many rejects: the run's, not a resource's
        return str(outcome.error)
    causes = "; ".join(f"{', '.join(names)}: {message}" for message, names in failed.items())
    return causes + (f"\n  hint: {outcome.error.hint}" if outcome.error.hint else "")


def _counts(pipeline: Pipeline) -> dict[str, int]:
    stats = pipeline.stats.values()
    return {
        "pages": sum(s.pages for s in stats),
        "records_fetched": sum(s.fetched for s in stats),
        "records_loaded": sum(s.loaded for s in stats),
        "records_rejected": sum(s.rejected for s in stats),
        "requests": pipeline.counters.requests,
        "retries": pipeline.retries,
        "token_requests": pipeline.token_requests,
    }
