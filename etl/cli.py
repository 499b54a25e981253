"""`python -m etl`: parse the command line, set up logging and signals, hand off, exit with SPEC.md's code.

Global options are accepted before or after the command. Every failure is
reported as one message (with a hint where there is one) on stderr, through
logging so that `--log-format json` keeps every line a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn

from etl import __version__
from etl.config import Config, EnvSettings, config_named_by, config_path, database_url_key, load_config
from etl.durations import isoformat_utc, parse_duration, parse_instant
from etl.errors import ConfigError, EtlError
from etl.logs import option_given, setup_logging, wants_json
from etl.pipeline import GRACE_SECONDS, RunOutcome
from etl.progress import progress_for_terminal

log = logging.getLogger("etl")

VALUE_FLAGS = ("--window", "--from", "--to")
NEGATIVE_VALUE = re.compile(r"-[0-9P]")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError (exit 2), reported like every other error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", default=default, help="config file (default: $ETL_CONFIG, else ./config.toml)")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=default if suppress else "text", help="stderr log format"
    )
    parser.add_argument("-v", "--verbose", action="count", default=default if suppress else 0, help="more detail")
    parser.add_argument("-q", "--quiet", action="store_true", default=default if suppress else False, help="warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m etl", description="Load a legacy REST API behind OAuth2 into a SQL database.")
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    sync = command("sync", "incremental load of every resource (or the named ones) from its watermark")
    sync.add_argument("--resource", action="append", dest="resources", metavar="NAME", help="only this resource (repeatable)")

    backfill = command("backfill", "(re)load the half-open interval [--from, --to), resuming an interrupted run")
    backfill.add_argument("--from", dest="start", required=True, metavar="T", help="YYYY-MM-DD or ISO-8601 (naive = UTC)")
    backfill.add_argument("--to", dest="end", required=True, metavar="T", help="exclusive end, same forms")
    backfill.add_argument("--resource", action="append", dest="resources", metavar="NAME", help="only this resource (repeatable)")
    backfill.add_argument("--window", metavar="DURATION", help="window size, e.g. 1d or PT6H (default: each resource's window)")
    backfill.add_argument("--restart", action="store_true", help="forget finished windows of this interval and load it all again")

    check = command("check", "test every step from DNS to the database, with a hint for each failure")
    check.add_argument("--save-certs", metavar="FILE", help="write the certificate chains the hosts present, as PEM")
    check.add_argument("--format", choices=["text", "json"], default="text", dest="output_format",
                       help="the report as text (default) or as one JSON document on stdout")

    command("migrate", "bring etl's tables to the current schema version")
    command("status", "recent runs, watermarks, unfinished windows and rejected-record counts")
    command("demo", "run the bundled API simulator and a sync into the configured database")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerate_narrow_encodings()
    setup_logging("json" if wants_json(argv) else "text", 0)
    try:
        args = build_parser().parse_args(_attach_negative_values(argv))
        if args.quiet and args.verbose:  # one may come before the command and one after: argparse cannot tell
            raise ConfigError("python -m etl: -v and -q together: choose one (-v for more detail, -q for warnings and errors only)")
    except ConfigError as exc:
        log.error("%s", exc)
        if _asks_for_check_json(argv):  # `check --format json | jq` reads stdout: a refused command line is a document too
            from etl.check import usage_error_document

            print(usage_error_document(exc), flush=True)
        return exc.exit_code
    setup_logging(args.log_format, -1 if args.quiet else min(args.verbose, 1))
    _tune_garbage_collector()
    try:
        return asyncio.run(_dispatch(args))
    except EtlError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 1
    except BrokenPipeError:  # `etl status | head -1`: the reader has gone; no traceback, now or when Python flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug: its traceback goes through logging, so JSON logs stay one object per line
        log.exception("internal error: %s: %s", type(exc).__name__, exc)
        return 1


def _asks_for_check_json(argv: list[str]) -> bool:
    """Whether the command line, even one argparse refused, is `check` with `--format json`."""
    return "check" in argv and option_given(argv, "--format", "json")


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--window -1d` as `--window=-1d`: argparse took `-1d` for an option ("expected one argument"), so the
    value never reached the check that says what is wrong with it. Only values that start with a digit or an
    ISO-8601 P after the minus: no option of etl looks like that."""
    attached: list[str] = []
    for token in argv:
        if attached and attached[-1] in VALUE_FLAGS and NEGATIVE_VALUE.match(token):
            attached[-1] = f"{attached[-1]}={token}"
        else:
            attached.append(token)
    return attached


def _tolerate_narrow_encodings() -> None:
    """Under LANG=C or PYTHONIOENCODING=latin-1 a ✔ or a name like 李小龍 crashed the output with a
    UnicodeEncodeError (exit 1 whatever the result): such characters are written as escapes instead."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _tune_garbage_collector() -> None:
    """Collect less often: a page allocates thousands of objects, and with the default thresholds the
    collector ran every few records and rescanned every module's objects (~15% of a backfill's time).

    What exists once the modules are imported lives for the whole process, so it is frozen out of the scans.
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


async def _dispatch(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
        "sync": _sync,
        "backfill": _backfill,
        "check": _check,
        "migrate": _migrate,
        "status": _status,
        "demo": _demo,
    }
    return await handlers[args.command](args)


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config), config_named_by(args.config))


def _database_url(args: argparse.Namespace) -> str:
    """The database of `status` and `migrate`, which need nothing else of the config.

    With no config file named and none in the working directory, $ETL_DATABASE_URL alone will do, as it
    does for `demo`: a new user who ran the demo without a config file could not look at what it loaded.
    """
    if config_named_by(args.config) or config_path(None).is_file():
        return _load(args).database.url
    env_url = EnvSettings().database_url
    if env_url:
        return env_url
    try:
        return _load(args).database.url  # fails: no file; its message says where it looked
    except ConfigError as exc:
        hint = f"`{args.command}` needs only the database: $ETL_DATABASE_URL will do (`demo` without a config file loads sqlite:///etl.db)"
        raise ConfigError(exc.message, hint=hint) from None


def stop_on_signals() -> asyncio.Event:
    """SIGTERM or SIGINT sets the event: in-flight pages finish and are committed, nothing new starts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signame: str) -> None:
        if stop.is_set():
            log.warning(
                "%s received: already stopping; requests still in flight are cancelled at the latest %.0fs after the stop, "
                "then what was fetched is committed", signame, GRACE_SECONDS,
            )
            return
        log.warning("%s received: finishing the requests in flight (up to %.0fs), committing, then stopping", signame, GRACE_SECONDS)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signal.Signals(signum).name)
    return stop


async def _sync(args: argparse.Namespace) -> int:
    from etl import runs

    config = _load(args)
    outcome = await runs.sync(config, args.resources, stop_on_signals(), progress_for_terminal(args.log_format))
    return report(outcome)


async def _backfill(args: argparse.Namespace) -> int:
    from etl import runs
    from etl.planning import check_backfill_windows
    from etl.status import command_flags

    start, end = _instant("--from", args.start), _instant("--to", args.end)
    if start >= end:
        raise ConfigError(f"--from {isoformat_utc(start)} must be before --to {isoformat_utc(end)}")
    window = None if args.window is None else _window(args.window)
    config = _load(args)
    resources = runs.select_resources(config, args.resources)  # an unknown --resource is exit 2 before the interval is announced
    check_backfill_windows(resources, start, end, window)  # so are windows that cannot be planned
    print(f"backfill from {isoformat_utc(start)} to {isoformat_utc(end)} (UTC, end excluded)", flush=True)
    whole = [resource.name for resource in resources if resource.filter is None]
    if whole:  # the interval above is not what they load: say so before a large one is read
        print(f"{', '.join(whole)}: no [resources.filter], so the API cannot be asked for an interval: "
              "loading all of it (a full refresh)", flush=True)
    outcome = await runs.backfill(config, start, end, args.resources, window, args.restart, stop_on_signals(), progress_for_terminal(args.log_format))
    given = {"from": args.start, "to": args.end, "window": args.window, "resources": args.resources}
    return report(outcome, continued_by=f"the same backfill ({command_flags('backfill', given)}) run again")


def _window(value: str) -> timedelta:
    """A zero window is refused rather than read as "no --window", which would quietly use the config's."""
    try:
        window = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"--window: {exc}") from None
    if window <= timedelta(0):
        raise ConfigError(f"--window {value}: must be longer than zero")
    return window


def _instant(flag: str, value: str) -> datetime:
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


async def _check(args: argparse.Namespace) -> int:
    from etl.check import run_check

    return await run_check(
        config_path(args.config), save_certs=args.save_certs, output_format=args.output_format, named_by=config_named_by(args.config)
    )


async def _migrate(args: argparse.Namespace) -> int:
    from etl.db import create_engine, migrate, require_lasting

    url = _database_url(args)
    require_lasting(url)
    engine = create_engine(url)
    try:
        before, after = await migrate(engine)
    finally:
        await engine.dispose()
    print(f"schema at revision {after}" + (" (already current)" if before == after else f" (was {before or 'empty'})"))
    return 0


async def _status(args: argparse.Namespace) -> int:
    from etl.db import create_engine, require_lasting
    from etl.status import format_status, read_status

    url = _database_url(args)
    require_lasting(url)
    _require_sqlite_file(url)
    engine = create_engine(url, reading=True)
    try:
        print(format_status(await read_status(engine)))
    finally:
        await engine.dispose()
    return 0


def _require_sqlite_file(url: str) -> None:
    """status only reads: opening a SQLite file that is not there would create it, empty, and report on that."""
    from etl.db import sqlite_file

    path = sqlite_file(url)
    if path is not None and not path.exists():
        key = database_url_key()
        where = key if key.startswith("$") else "[database].url (a relative path is beside the config file) or $ETL_DATABASE_URL"
        raise EtlError(
            f"there is no database file at {path}",
            hint=f"check {where}; if it is right, no run has happened yet: a sync or `python -m etl migrate` creates it",
        )


async def _demo(args: argparse.Namespace) -> int:
    from etl.demo import run_demo

    outcome, note = await run_demo(args.config, stop_on_signals(), progress_for_terminal(args.log_format))
    code = report(outcome)
    if note is not None:
        _print_lines([note])
    return code


def report(outcome: RunOutcome, continued_by: str = "the next run") -> int:
    """One line per resource on stdout (what cron mails, and all it prints there: SPEC's "one summary line per
    resource"), then the verdict as a log line on stderr; returns the exit code.

    `continued_by` is what takes up unfinished windows: a backfill's are not the nightly sync's to take up.
    """
    lines = []
    for stats in outcome.resources.values():
        rate = stats.loaded / stats.seconds if stats.seconds > 0 else 0.0
        line = (
            f"{stats.name}: {stats.loaded} loaded, {stats.rejected} rejected, {stats.pages} page{'' if stats.pages == 1 else 's'}, "
            f"{stats.windows_done}/{stats.windows} windows, {stats.seconds:.1f}s ({rate:,.0f} records/s)"
        )
        if stats.error:
            line += f" — FAILED: {stats.error}"
        elif stats.windows_done < stats.windows and outcome.error is not None:
            line += f" — NOT FINISHED: {continued_by} continues it"
        lines.append(line)
    _print_lines(lines)
    log.log(
        logging.INFO if outcome.error is None else logging.WARNING,  # -q keeps the verdict of a run that did not succeed
        "run %d %s in %.1fs: %d requests, %d retried, %d token request(s)",
        outcome.run_id, outcome.status, outcome.seconds, outcome.requests, outcome.retries, outcome.token_requests,
    )
    if outcome.error is not None and not outcome.error_logged:
        log.error("%s", outcome.error)
    return outcome.exit_code


def _print_lines(lines: list[str]) -> None:
    """Print to stdout; a reader that went away (`etl sync | head -1`) costs the lines, not the exit code."""
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's last flush is quiet
