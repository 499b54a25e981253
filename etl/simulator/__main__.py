"""`python -m etl.simulator`: serve until SIGTERM/SIGINT, announce the URLs as one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from .app import Faults
from .data import KINDS
from .server import Simulator, SimulatorSettings, demo_settings

# flag -> Faults field, for the flags that map one to one
FAULT_FLAGS = {
    "fault_503": "rate_503",
    "fault_500": "rate_500",
    "fault_429": "rate_429",
    "fault_reset": "rate_reset",
    "fault_truncated": "rate_truncated",
    "fault_html": "rate_html",
    "delay_ms": "delay_ms",
    "jitter_ms": "delay_jitter_ms",
    "retry_after": "retry_after_s",
    "revoke_every": "revoke_every_s",
    "token_503_count": "token_503_count",
    "token_delay_ms": "token_delay_ms",
    "outage": "outage",
    "repeat_cursor": "repeat_cursor",
    "absolute_links": "absolute_links",
}


def parse_count(text: str) -> tuple[str, int]:
    name, sep, number = text.partition("=")
    if not sep or name not in KINDS or not number.isdigit():
        known = ", ".join(KINDS)
        raise argparse.ArgumentTypeError(f"expected RESOURCE=N with RESOURCE one of {known}: {text!r}")
    return name, int(number)


def parse_moment(text: str) -> datetime:
    """A date or an ISO-8601 datetime; naive means UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD or an ISO-8601 datetime: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    defaults = demo_settings()
    parser = argparse.ArgumentParser(prog="python -m etl.simulator", description=__doc__)
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    parser.add_argument(
        "--records", type=parse_count, nargs="+", action="extend", default=[], metavar="RESOURCE=N",
        help="records per resource, e.g. orders=1000000",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-start", type=parse_moment, default=defaults.data_start)
    parser.add_argument("--data-end", type=parse_moment, default=defaults.data_end)
    parser.add_argument("--client-id", default=defaults.client_id)
    parser.add_argument("--client-secret", default=defaults.client_secret)
    parser.add_argument("--scope", action="append", dest="scopes", help="allowed scope (repeatable)")
    parser.add_argument("--token-lifetime", type=int, default=defaults.token_lifetime_s, help="seconds")
    parser.add_argument("--tls", action="store_true", help="serve https with a fresh self-signed certificate")
    parser.add_argument(
        "--prebuild", action="store_true", help="encode every record at start-up: cheap pages for benchmarks"
    )
    faults = parser.add_argument_group("faults (API requests unless token_*)")
    for flag in ("fault_503", "fault_500", "fault_429", "fault_reset", "fault_truncated", "fault_html"):
        faults.add_argument("--" + flag.replace("_", "-"), type=float, default=0.0, metavar="RATE")
    faults.add_argument("--delay-ms", type=float, default=0.0)
    faults.add_argument("--jitter-ms", type=float, default=0.0)
    faults.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds of 429 answers")
    faults.add_argument("--revoke-every", type=float, metavar="S", help="tokens die after S seconds")
    faults.add_argument("--token-503-count", type=int, default=0)
    faults.add_argument("--token-delay-ms", type=float, default=0.0)
    faults.add_argument("--outage", action="store_true")
    faults.add_argument("--repeat-cursor", action="store_true")
    faults.add_argument("--absolute-links", action="store_true")
    return parser


def settings_from(args: argparse.Namespace) -> SimulatorSettings:
    return SimulatorSettings(
        seed=args.seed,
        counts=dict(args.records),
        data_start=args.data_start,
        data_end=args.data_end,
        client_id=args.client_id,
        client_secret=args.client_secret,
        scopes=set(args.scopes) if args.scopes else demo_settings().scopes,
        token_lifetime_s=args.token_lifetime,
        tls=args.tls,
        prebuild=args.prebuild,
        host=args.host,
        port=args.port,
        faults=Faults(**{field: getattr(args, flag) for flag, field in FAULT_FLAGS.items()}),
    )


async def serve(settings: SimulatorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Simulator(settings) as sim:
        sys.stdout.write(orjson.dumps(sim.ready_line()).decode() + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:  # includes pydantic's ValidationError
        parser.error(str(exc))
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
