"""One run of `sync` or `backfill`: fetch workers feed one loader through a bounded queue.

    windows ─► workers (≤ concurrency) ─► bounded queue ─► loader ─► Store.commit (one transaction per batch)

Workers page through their windows and validate each page; the queue's bound
is the backpressure that keeps memory flat whatever the size of the API. A
single loader groups many pages into one transaction with their windows'
progress and the watermark, because a commit per page would cap throughput.

A failing window stops its resource (other resources go on); a failure that
concerns every resource (token endpoint, TLS, DNS, database) stops the run. A
stop, for any reason including SIGTERM, lets in-flight pages finish within a
grace period and commits them: what is committed is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from typing import Any

from pydantic import SecretStr

from etl.client import (
    ApiClient,
    ApiClock,
    PageResponse,
    RequestCounters,
    bad_request_hint,
    not_found_hint,
    too_deep_hint,
)
from etl.config import Config, ResourceConfig
from etl.durations import format_duration
from etl.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    EtlError,
    Interrupted,
    LoadError,
    RefusedRequest,
    TokenEndpointFailed,
    TokenRefusedByApi,
    UnreachableError,
)
from etl.logs import register_secret, resource_var, run_id_var, window_var
from etl.paginators import PagePlan, Paginator, PlannedPage, window_paginator
from etl.planning import ResourcePlan
from etl.progress import NoProgress, ProgressDisplay
from etl.records import RecordValidator, ValidatedPage, records_at
from etl.store import LoadBatch, Store, WindowProgress, WindowRecord
from etl.token import TokenManager
from etl.transport import RetryPolicy, open_session

log = logging.getLogger(__name__)

BATCH_ROWS = 5000
FLUSH_SECONDS = 1.0
QUEUE_PAGES = 64
QUEUE_ROWS = 4 * BATCH_ROWS  # records waiting for the loader, however large the pages: 64 pages of 20,000 held 1 GB
# an ISO-8601 time whose offset is not UTC's: a zone's offset changes with DST, and its text with it
LOCAL_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?\s*[+-](?!00(?::?00)?$)\d\d(?::?\d\d)?$")
API_CLOCK_WARNING = timedelta(minutes=1)  # clocks kept by NTP are never this far apart
GRACE_SECONDS = 15.0
RUN_WIDE_ERRORS = (AuthError, UnreachableError, LoadError, ConfigError, TokenEndpointFailed)


@dataclass
class ResourceStats:
    name: str
    pages: int = 0
    fetched: int = 0
    loaded: int = 0
    rejected: int = 0
    first_reject: str | None = None  # `key 1: name: ... (got 'w1')`: the run's error says why, not only how many
    windows: int = 0
    windows_done: int = 0
    cursors_seen: bool = False  # a record carried cursor_field: else the watermark cannot move
    local_time_cursor: str | None = None  # a text cursor holding a time with an offset: text order is not time order
    cursor_path_found: bool = False  # a page carried next_cursor_path (cursor style)
    cursor_path_absent: str | None = None  # where next_cursor_path left a full page, when one did
    more_pages: str | None = None  # style none: where the API said that another page follows, when it did
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def note_paginator(self, paginator: Paginator) -> None:
        """What a window's paginator saw of next_cursor_path and of further pages, kept over the run's windows for
        the warnings at its end."""
        self.cursor_path_found = self.cursor_path_found or paginator.cursor_path_found
        self.cursor_path_absent = self.cursor_path_absent or paginator.cursor_path_absent
        self.more_pages = self.more_pages or paginator.more_pages


@dataclass
class RunOutcome:
    """What the CLI reports and exits with."""

    run_id: int
    status: str
    error: EtlError | None
    resources: dict[str, ResourceStats]
    requests: int
    retries: int
    token_requests: int
    seconds: float
    error_logged: bool = False  # the run's error was logged when it happened: the verdict need not repeat it

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else self.error.exit_code


@dataclass
class _Page:
    """A fetched page on its way to the loader; `fetched` is None for the marker that closes a resumed window."""

    window: WindowRecord
    page: ValidatedPage
    position: dict[str, Any]
    finished: bool
    fetched: int | None


@dataclass
class _WindowFailed:
    window: WindowRecord
    error: EtlError


_END = object()


class _LoaderQueue:
    """What workers hand the loader: at most QUEUE_PAGES items and QUEUE_ROWS records wait, but a page larger than
    that passes alone. Bounded in pages only, it held 64 x page_size records (1.3 million at 20,000 a page).

    Putters go in turn, so a large page waiting for room is not overtaken for ever by small ones.
    """

    def __init__(self) -> None:
        self._items: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
        self._rows = 0
        self._turn = asyncio.Lock()
        self._room = asyncio.Event()

    async def put(self, item: Any, rows: int = 0) -> None:
        async with self._turn:
            while self._items.qsize() >= QUEUE_PAGES or (self._rows and self._rows + rows > QUEUE_ROWS):
                self._room.clear()
                await self._room.wait()
            self._rows += rows
            self._items.put_nowait((item, rows))

    async def get(self) -> Any:
        item, rows = await self._items.get()  # nothing awaited after it: a cancelled get loses no item
        self._rows -= rows
        self._room.set()
        return item


class _Lanes:
    """Planned pages fetched by parallel lanes and handed out in page order, at most `ahead` pages early."""

    def __init__(self, planned: Iterator[PlannedPage], ahead: int, stopping: Callable[[], bool]) -> None:
        self._planned = planned
        self._ahead = ahead
        self._stopping = stopping
        self._order: deque[tuple[PlannedPage, asyncio.Future[PageResponse]]] = deque()
        self._changed = asyncio.Event()
        self._lanes = 0
        self._closed = False

    def start(self, client: ApiClient, lanes: int) -> list[asyncio.Task[None]]:
        self._lanes += lanes
        return [asyncio.create_task(self._run(client)) for _ in range(lanes)]

    async def _run(self, client: ApiClient) -> None:
        """One lane: take the next page in order, fetch it, repeat; ends with the plan, a stop or a failure."""
        try:
            while not self._closed and not self._stopping():
                if len(self._order) >= self._ahead:
                    await self._wait()
                    continue
                planned = next(self._planned, None)
                if planned is None:
                    return
                arrival: asyncio.Future[PageResponse] = asyncio.get_running_loop().create_future()
                self._order.append((planned, arrival))
                self._changed.set()
                try:
                    arrival.set_result(await client.get(planned.request))
                except Exception as exc:  # the consumer raises it when it reaches this page
                    arrival.set_exception(exc)
                    return
        finally:
            self._lanes -= 1
            self._changed.set()

    async def next_page(self) -> tuple[PlannedPage, PageResponse] | None:
        """The next page in order once it has arrived; None when every lane has ended and nothing is left."""
        while not self._order:
            if self._lanes == 0:
                return None
            await self._wait()
        planned, arrival = self._order[0]
        response = await arrival
        self._order.popleft()
        self._changed.set()
        return planned, response

    def close(self) -> None:
        self._closed = True
        for _, arrival in self._order:
            if not arrival.done():
                arrival.cancel()
            elif not arrival.cancelled():
                arrival.exception()  # retrieved: a page after a failed one is not an unhandled error

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

Planner = Callable[[Store, ResourceConfig, int], Awaitable[ResourcePlan]]


class Pipeline:
    """Runs the windows of a plan to completion, failure or interruption."""

    def __init__(
        self,
        config: Config,
        store: Store,
        run_id: int,
        stop: asyncio.Event,
        progress: ProgressDisplay | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.stop = stop
        self.progress = progress or NoProgress()
        self.counters = RequestCounters()
        self.api_clock = ApiClock()
        self.stats: dict[str, ResourceStats] = {}
        self._plans: dict[str, ResourcePlan] = {}
        self._validators: dict[str, RecordValidator] = {}
        self._failed: dict[str, EtlError] = {}  # by resource, the error that stopped it
        self._errors: list[EtlError] = []
        self._queue = _LoaderQueue()
        self._tokens: TokenManager | None = None
        self._window_owner: dict[int, str] = {}
        self._fetching: dict[int, WindowRecord] = {}  # by id, the windows workers are on: named if a stop cuts them short

    @property
    def token_requests(self) -> int:
        return self._tokens.token_requests if self._tokens else 0

    @property
    def retries(self) -> int:
        """Retried requests: after 429, 5xx, timeouts and resets, and after a 401 answered with a new token."""
        return self.counters.retries + (self._tokens.retried_after_401 if self._tokens else 0)

    async def run(self, plans: list[ResourcePlan], secret: SecretStr) -> RunOutcome:
        started = time.monotonic()
        register_secret(secret.get_secret_value())
        for plan in plans:
            name = plan.resource.name
            self._window_owner.update((window.id, name) for window in plan.windows)
            self._plans[name] = plan
            self._validators[name] = RecordValidator(plan.resource)
            self.stats[name] = ResourceStats(name, windows=len(plan.windows), windows_done=len(plan.windows) - len(plan.pending))
        self.progress.start([plan.resource.name for plan in plans])
        try:
            async with open_session(self.config.api) as session:
                retry = RetryPolicy.from_api(self.config.api, self.stop)
                self._tokens = TokenManager(self.config.auth, secret, session, retry)
                client = ApiClient(self.config.api, session, self._tokens, self.counters, retry, self.api_clock)
                try:
                    await self._fetch_and_load(client, plans)
                finally:
                    await self._tokens.close()
        finally:
            self.progress.stop()
        for stats in self.stats.values():
            stats.finished = stats.finished or time.monotonic()
            resource = self._plans[stats.name].resource
            self._warn_if_no_cursor(resource, stats)
            self._warn_if_local_time_text(resource, stats)
            self._warn_if_no_next_cursor(resource, stats)
            self._warn_if_more_pages(resource, stats)
            self._warn_of_unseen_columns(resource, stats)
        self._warn_of_api_clock()
        self._blame_run_wide_cause()
        return self._outcome(time.monotonic() - started)

    def _warn_of_api_clock(self) -> None:
        """An API clock behind ours is why "loaded up to" stayed that far back: said, since NTP would put it right."""
        behind = self.api_clock.behind
        if behind >= API_CLOCK_WARNING:
            log.warning("the API's clock (the Date of its answers) is %s behind this machine's: the watermarks are "
                        "kept that far back, so that the records it stamps meanwhile are read by the next run; "
                        "check the time (NTP) of both hosts", format_duration(timedelta(seconds=int(behind.total_seconds()))))

    @staticmethod
    def _warn_if_no_cursor(resource: ResourceConfig, stats: ResourceStats) -> None:
        """A cursor_field no record carries (a typo, a renamed field) would leave the watermark still without a word."""
        if resource.cursor_field and stats.loaded and not stats.cursors_seen:  # rejects do not count: they may carry it
            log.warning(
                "%s: cursor_field %r was in none of the %d records loaded: the watermark's highest cursor "
                "does not move; check resources.%s.cursor_field against the API's records",
                resource.name, resource.cursor_field, stats.loaded, resource.name,
            )

    @staticmethod
    def _warn_if_local_time_text(resource: ResourceConfig, stats: ResourceStats) -> None:
        """A text cursor compares as text: where the API's offset changes (DST), a newer time sorts before an older
        one, and "latest wins" kept the older version for good, without a word."""
        if stats.local_time_cursor is not None:
            log.warning(
                "%s: cursor %r is text holding times with an offset (%r): \"latest wins\" compares them as text, "
                "which puts a newer time before an older one when the offset changes (DST), and keeps the older "
                "version; declare resources.%s.columns.%s = \"datetime\"",
                resource.name, resource.cursor_field, stats.local_time_cursor, resource.name, resource.cursor_field,
            )

    @staticmethod
    def _warn_if_no_next_cursor(resource: ResourceConfig, stats: ResourceStats) -> None:
        """A next_cursor_path no page carries (a typo) ends every window after its first page, as a last page would.

        Full pages without it, and no page with it, tell a typo from an API that drops the key on its last page.
        """
        pagination = resource.pagination
        if pagination.style != "cursor" or stats.cursor_path_found or stats.cursor_path_absent is None:
            return
        log.warning(
            "%s: next_cursor_path %r was in no page of the run, though pages of %d records (page_size) came without it: "
            "each such window ended after its first page. %s; check resources.%s.pagination.next_cursor_path, "
            "then backfill what was missed",
            resource.name, pagination.next_cursor_path, pagination.page_size, stats.cursor_path_absent, resource.name,
        )

    @staticmethod
    def _warn_if_more_pages(resource: ResourceConfig, stats: ResourceStats) -> None:
        """Without [resources.pagination] (style "none") a paging API's first page was all that was loaded, exit 0 and
        no word. A warning, not exit 1, as for next_cursor_path: what says "more" is read from keys etl guesses at."""
        if stats.more_pages is None:
            return
        then = "the next sync reads it all again" if resource.filter is None else "backfill what was missed"
        log.warning(
            "%s: resources.%s.pagination.style is \"none\" (one request a window), but the API said that more pages "
            "follow: %s; only the first page was loaded. Set [resources.pagination] to the way the API pages (page, "
            "offset, cursor or link_header); %s",
            resource.name, resource.name, stats.more_pages, then,
        )

    def _warn_of_unseen_columns(self, resource: ResourceConfig, stats: ResourceStats) -> None:
        """A column no loaded record carries (`nmae` for `name`) is NULL in every row: exit 0 said nothing of it."""
        if stats.loaded:
            for warning in self._validators[resource.name].unseen_warnings(stats.loaded):
                log.warning("%s: %s", resource.name, warning)

    async def _fetch_and_load(self, client: ApiClient, plans: list[ResourcePlan]) -> None:
        jobs = _interleave([[(plan.resource, window) for window in plan.pending] for plan in plans])
        loader = asyncio.create_task(self._load(), name="loader")
        job_queue: asyncio.Queue[tuple[ResourceConfig, WindowRecord]] = asyncio.Queue()
        for job in jobs:
            job_queue.put_nowait(job)
        workers = [
            asyncio.create_task(self._work(client, job_queue), name=f"worker-{n}")
            for n in range(min(self.config.api.concurrency, len(jobs)))
        ]
        workers_done = asyncio.gather(*workers)
        try:
            await self._wait_for_workers(workers_done, loader)
        finally:  # even when a worker failed unexpectedly, what is queued is committed
            await self._close_loader(loader)

    async def _close_loader(self, loader: asyncio.Task[None]) -> None:
        """Tell the loader that no page will come, and wait for its last commit."""
        closing = asyncio.create_task(self._queue.put(_END))
        await asyncio.wait([closing, loader], return_when=asyncio.FIRST_COMPLETED)
        if loader.done():
            closing.cancel()
        await loader

    async def _wait_for_workers(self, workers_done: asyncio.Future[Any], loader: asyncio.Task[None]) -> None:
        """Workers run until their windows end or a stop; after a stop, requests in flight get GRACE_SECONDS, then are cancelled.

        A loader that ended early (the database failed) ends them at once: nothing more can be committed.
        """
        stopping = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([workers_done, loader, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not workers_done.done() and not loader.done():
                await asyncio.wait([workers_done, loader], timeout=GRACE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                if not workers_done.done() and not loader.done():
                    self._warn_cut_short()
        finally:
            stopping.cancel()
        if not workers_done.done():
            workers_done.cancel()
            await asyncio.gather(workers_done, return_exceptions=True)
        elif not workers_done.cancelled() and workers_done.exception():
            raise workers_done.exception()  # type: ignore[misc]

    def _warn_cut_short(self) -> None:
        windows = [f"{window.resource} {window.window}" for window in self._fetching.values()]
        shown = ", ".join(windows[:5]) + (f" and {len(windows) - 5} more" if len(windows) > 5 else "")
        log.warning(
            "requests in flight did not finish within the %.0fs grace period after the stop; cancelling them. "
            "Unfinished, what they committed kept, for the next run: %s",
            GRACE_SECONDS, shown or "none",
        )

    # -- fetching ----------------------------------------------------------------------------------

    async def _work(self, client: ApiClient, jobs: asyncio.Queue[tuple[ResourceConfig, WindowRecord]]) -> None:
        run_id_var.set(self.run_id)
        while not self.stop.is_set():
            try:
                resource, window = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            if resource.name in self._failed:
                continue
            resource_var.set(resource.name)
            window_var.set(str(window.window))
            self._fetching[window.id] = window
            try:
                await self._fetch_window(client, resource, window)
            except Interrupted:
                return  # stopped in a retry's wait: the window stays unfinished, as it was committed
            except EtlError as exc:
                self._fail(resource, exc)
                await self._queue.put(_WindowFailed(window, exc))
            finally:
                del self._fetching[window.id]

    async def _fetch_window(self, client: ApiClient, resource: ResourceConfig, window: WindowRecord) -> None:
        paginator = window_paginator(resource, self.config.api.base_url, window.window)
        if window.position:
            paginator.resume(window.position)
        first = paginator.records_seen == 0
        while not self.stop.is_set() and resource.name not in self._failed:
            request = paginator.request()
            if request is None:
                if window.position and window.position.get("finished"):
                    await self._close_window(window, paginator.position())
                return
            try:
                response = await client.get(request)
            except RefusedRequest as refused:
                if not paginator.ends_at(refused.status):
                    raise self._refusal_hinted(refused, resource, first) from None
                await self._close_window(window, paginator.position())
                return
            records = records_at(response.body, resource.records_path, response.url, _records_key(resource))
            records = paginator.advance(response, records)
            self.stats[resource.name].note_paginator(paginator)
            total = paginator.known_total(response)  # after advance: a total the page already exceeded is None
            if first and total is not None:
                self.progress.add_total(resource.name, total)
            first = False
            await self._queue_page(resource, window, records, paginator.position(), paginator.finished)
            plan = paginator.remaining_requests(total) if total is not None else None
            if plan is not None:
                try:
                    beyond = await self._fetch_planned(client, resource, window, plan)
                except RefusedRequest as refused:  # a later page: a search backend's depth cap is refused here most
                    raise self._refusal_hinted(refused, resource, first_page=False) from None
                if beyond is None:
                    return
                paginator.restore(beyond)  # the total was understated: page on one by one

    def _refusal_hinted(self, refused: RefusedRequest, resource: ResourceConfig, first_page: bool) -> RefusedRequest:
        """A refusal the status alone has no hint for, hinted at the keys the request is made of: a 404 on a window's
        first page is a wrong base_url or path, a 400 there a parameter, and a 400 after pages were served a depth
        the API does not page to. Cron's log said only "404: Not Found", or quoted the 400's body."""
        if refused.hint:
            return refused
        bad_request = refused.status in (HTTPStatus.BAD_REQUEST, HTTPStatus.UNPROCESSABLE_ENTITY)
        if first_page and refused.status == HTTPStatus.NOT_FOUND:
            hint = not_found_hint(self.config.api.base_url, resource.name, resource.path)
        elif first_page and bad_request:
            hint = bad_request_hint(resource)
        elif bad_request and resource.pagination.style in ("page", "offset"):
            hint = too_deep_hint(resource)
        else:
            return refused
        return RefusedRequest(refused.message, status=refused.status, hint=hint)

    async def _fetch_planned(
        self, client: ApiClient, resource: ResourceConfig, window: WindowRecord, plan: PagePlan
    ) -> dict[str, Any] | None:
        """The rest of a window whose total is known: `concurrency` lanes of requests, pages queued in page order.

        In page order so that a committed position has every page before it committed too. Each lane
        sends its next request as soon as its response is read, before any page is validated: with
        50 ms of latency, refilling only between validations cost ~10% of the throughput. At most
        2 x `concurrency` pages wait here, so memory stays bounded however long the window. After a
        stop, requests already sent are awaited and queued (the grace period bounds them), none are added.
        Returns where to page on from when the last page showed that the API's total was too low.
        """
        concurrency = self.config.api.concurrency
        lanes = _Lanes(iter(plan), 2 * concurrency, lambda: self.stop.is_set() or resource.name in self._failed)
        tasks = lanes.start(client, min(concurrency, len(plan)))
        try:
            while (head := await lanes.next_page()) is not None:
                planned, response = head
                records = records_at(response.body, resource.records_path, response.url, _records_key(resource))
                plan.check(planned, response, records)
                beyond = plan.beyond(planned, records)
                if beyond is not None:
                    log.warning(
                        "%s: the API's total for this window is too low: its last page by that total held %d records, "
                        "not %d; paging on until an empty or short page", response.url, len(records), planned.expected,
                    )
                    await self._queue_page(resource, window, records, beyond, False)
                    return beyond
                await self._queue_page(resource, window, records, planned.position, planned.finished)
            return None
        finally:
            lanes.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _queue_page(
        self, resource: ResourceConfig, window: WindowRecord, records: list[Any], position: dict[str, Any], finished: bool
    ) -> None:
        """Validate a fetched page, count it, and queue it for the loader; a full queue holds the fetcher back."""
        page = self._validators[resource.name].validate(records)
        stats = self.stats[resource.name]
        stats.pages += 1
        stats.fetched += len(records)
        stats.cursors_seen = stats.cursors_seen or page.max_cursor is not None
        if isinstance(page.max_cursor, str) and stats.local_time_cursor is None and LOCAL_TIME.match(page.max_cursor):
            stats.local_time_cursor = page.max_cursor  # one test a page, on its highest cursor
        await self._queue.put(_Page(window, page, position, finished, len(records)), len(records))

    async def _close_window(self, window: WindowRecord, position: dict[str, Any]) -> None:
        """Mark a window finished with no page to load (resumed after its last page, or ended by a refusal)."""
        await self._queue.put(_Page(window, ValidatedPage([], [], None), position, True, None))

    def _fail(self, resource: ResourceConfig, exc: EtlError) -> None:
        if isinstance(exc, ConnectionFailed) and any(stats.pages for stats in self.stats.values()):
            exc = _stopped_midway(exc)
        # A run-wide cause is met by every worker in flight, each with its own URL: logged once. So is an error of the
        # kind that stopped the resource, met by its other windows in flight too (a 403 for a scope the token lacks, a
        # path that answers 500 to every retry): one ERROR and hint per window, each on its own URL, said nothing more.
        first = self._failed.get(resource.name)
        repeated = any(_same_cause(error, exc) for error in self._errors) or (
            first is not None and (isinstance(exc, RefusedRequest) or type(exc) is type(first))
        )
        log.log(logging.DEBUG if repeated else logging.ERROR, "%s", exc)
        self._errors.append(exc)
        self.stats[resource.name].error = self._failed.setdefault(resource.name, exc).message  # the first, the one logged
        if _run_wide(exc):
            self.stop.set()

    # -- loading ------------------------------------------------------------------------------------

    async def _load(self) -> None:
        """Group pages into batches and commit each in one transaction; ends at _END."""
        run_id_var.set(self.run_id)
        batch = LoadBatch()
        deadline = time.monotonic() + FLUSH_SECONDS
        try:
            while True:
                timeout = max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout) if not batch.is_empty() else await self._queue.get()
                except TimeoutError:
                    item = None
                if item is _END:
                    await self._commit(batch)
                    return
                if isinstance(item, _WindowFailed):
                    await self._commit(batch)
                    batch = LoadBatch()
                    await self.store.fail_window(item.window.id, str(item.error))
                    continue
                if isinstance(item, _Page):
                    if batch.is_empty():
                        deadline = time.monotonic() + FLUSH_SECONDS
                    self._add(batch, item)
                if item is None or batch.row_count >= BATCH_ROWS or time.monotonic() >= deadline:
                    await self._commit(batch)
                    batch = LoadBatch()
        except EtlError as exc:
            self._errors.append(exc)
            log.error("%s", exc)
            self.stop.set()

    def _add(self, batch: LoadBatch, item: _Page) -> None:
        name = item.window.resource
        plan = self._plans[name]
        batch.add_rows(name, item.window.id, item.page.rows)
        batch.rejects.extend((name, reject) for reject in item.page.rejects)
        progress = batch.windows.setdefault(item.window.id, WindowProgress())
        progress.pages += 0 if item.fetched is None else 1
        progress.records += len(item.page.rows)
        progress.rejects += len(item.page.rejects)
        progress.position = item.position
        if item.page.max_cursor is not None:
            progress.max_cursor = plan.tracker.saw_cursor(item.window.id, item.page.max_cursor)
        if item.finished:
            progress.done = True
            mark = plan.tracker.window_finished(item.window.id, self.api_clock.behind)
            if mark is not None:
                batch.watermarks = [m for m in batch.watermarks if m.resource != name] + [mark]

    async def _commit(self, batch: LoadBatch) -> None:
        if batch.is_empty():
            return
        batch.token_requests, batch.requests, batch.retries = self.token_requests, self.counters.requests, self.retries
        started = time.monotonic()
        refused = await asyncio.shield(self.store.commit(batch, self.run_id))
        log.debug("committed %d rows, %d rejects and the progress of %d windows in %.0f ms",
                  batch.row_count, len(batch.rejects) + len(refused), len(batch.windows), (time.monotonic() - started) * 1000)
        moved = Counter(name for name, _reject in refused)
        for name, rows in batch.rows.items():
            self.stats[name].loaded += len(rows) - moved[name]
        for name, reject in batch.rejects + refused:
            self.stats[name].rejected += 1
            self.stats[name].first_reject = self.stats[name].first_reject or f"key {reject.key or '(none)'}: {reject.error}"
        # the bar counts every record handled, rejects too: the API's total does, and a bar short of it looks unfinished
        handled = Counter({name: len(rows) for name, rows in batch.rows.items()}) + Counter(name for name, _ in batch.rejects)
        for name, records in handled.items():
            self.progress.advance(name, records)
        for window_id, progress in batch.windows.items():
            if progress.done:
                self.stats[self._window_owner[window_id]].windows_done += 1

    # -- the verdict --------------------------------------------------------------------------------

    def _outcome(self, seconds: float) -> RunOutcome:
        error: EtlError | None = self._errors[0] if self._errors else None
        rejected = sum(stats.rejected for stats in self.stats.values())
        unfinished = [stats.name for stats in self.stats.values() if stats.windows_done < stats.windows]
        if error is None and not self.stop.is_set() and unfinished:  # a bug, never a silent success
            error = EtlError(f"windows of {', '.join(unfinished)} ended unfinished; the same command run again continues them")
        if error is None and self.stop.is_set() and unfinished:  # a stop after the last window is a finished run
            error = Interrupted("the run was interrupted; what was in flight is committed, and the same command run again continues from there")
        if error is None and rejected > self.config.sync.max_rejects:
            error = self._too_many_rejects(rejected)
        status = "succeeded" if error is None else "interrupted" if isinstance(error, Interrupted) else "failed"
        return RunOutcome(
            run_id=self.run_id,
            status=status,
            error=error,
            resources=self.stats,
            requests=self.counters.requests,
            retries=self.retries,
            token_requests=self.token_requests,
            seconds=seconds,
            error_logged=bool(self._errors),  # the run's error is then the first met, logged at ERROR when it happened
        )

    def _too_many_rejects(self, rejected: int) -> EtlError:
        """How many, where, and the first reason of each resource: a column type that fits no record is fixed in
        config.toml, and the reason was only in etl_rejects."""
        rejecting = [stats for stats in self.stats.values() if stats.rejected]
        where = ", ".join(f"{stats.name}: {stats.rejected}" for stats in rejecting)
        reasons = "; ".join(f"the first of {stats.name}, {stats.first_reject}" for stats in rejecting)
        return EtlError(
            f"{rejected} records were rejected ({where}), more than [sync].max_rejects = {self.config.sync.max_rejects}; "
            f"{reasons}; all are in etl_rejects with their raw payload and the reason",
            hint="fix a column's type, source or nullable in [resources.columns], or raise [sync].max_rejects "
            "if the API does send bad records",
        )

    def _blame_run_wide_cause(self) -> None:
        """A cause that stopped every resource (API or token host down, the database) is the failure of each one it
        left unfinished, not only of the first to meet it: the others looked merely empty in the summary."""
        cause = next((error for error in self._errors if _run_wide(error)), None)
        for stats in self.stats.values():
            if cause is not None and stats.error is None and stats.windows_done < stats.windows:
                stats.error = cause.message


def _same_cause(earlier: EtlError, exc: EtlError) -> bool:
    """`exc` says nothing new after `earlier`: the same message, a run-wide cause, or a token the API refused again
    (an API that refuses every token fails each resource, on its own URL; the summary names each one)."""
    both_refused = isinstance(earlier, TokenRefusedByApi) and isinstance(exc, TokenRefusedByApi)
    return earlier.message == exc.message or _run_wide(earlier) or both_refused


def _run_wide(error: EtlError) -> bool:
    """A cause that stops every resource. A token the API refuses stops only its resource: API Gateway refuses
    one without a method's scope, and every other resource the token may read stopped with it."""
    return isinstance(error, RUN_WIDE_ERRORS) and not isinstance(error, TokenRefusedByApi)


def _records_key(resource: ResourceConfig) -> str:
    """The config key a wrong records_path is named by in the error: the line the user edits."""
    return f"resources.{resource.name}.records_path"


def _stopped_midway(exc: ConnectionFailed) -> EtlError:
    """A host that answered earlier in the run and then went away: the run stopped early (exit 1)."""
    return EtlError(f"the API stopped answering in the middle of the run: {exc.message}", hint=exc.hint)


def _interleave(lists: list[list[Any]]) -> list[Any]:
    """Round-robin across resources, so that each makes progress from the start."""
    merged: list[Any] = []
    for index in range(max((len(items) for items in lists), default=0)):
        merged.extend(items[index] for items in lists if index < len(items))
    return merged
