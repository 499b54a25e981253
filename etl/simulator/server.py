"""The Simulator: settings, lifecycle on a loopback port, and the test-facing handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from aiohttp import web

from .app import Counters, Faults, SimState, build_app
from .data import KINDS, Record, as_utc
from .tls import Certificate, make_certificate


@dataclass
class SimulatorSettings:
    """How a simulator behaves; the defaults are the demo's."""

    seed: int = 42
    counts: dict[str, int] = field(default_factory=dict)  # per resource; missing = the resource's default
    data_start: datetime = datetime(2024, 1, 1, tzinfo=UTC)
    data_end: datetime = datetime(2024, 1, 11, tzinfo=UTC)
    client_id: str = "demo-client"
    client_secret: str = "demo-secret"
    scopes: set[str] = field(default_factory=lambda: {"legacy-api/read", "legacy-api/write"})
    token_lifetime_s: int = 3600
    tls: bool = False
    prebuild: bool = False  # encode every record at start-up (benchmarks): a page then costs a join
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        self.data_start, self.data_end = as_utc(self.data_start), as_utc(self.data_end)
        if (self.data_end - self.data_start).total_seconds() < 1:
            raise ValueError("data_end must be at least one second after data_start")
        unknown = set(self.counts) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown resources in counts: {sorted(unknown)}; known: {sorted(KINDS)}")
        if any(n < 0 for n in self.counts.values()):
            raise ValueError("counts must not be negative")
        self.scopes = set(self.scopes)

    def all_counts(self) -> dict[str, int]:
        return {name: self.counts.get(name, kind.default_count) for name, kind in KINDS.items()}


def demo_settings() -> SimulatorSettings:
    """What `python -m etl demo` runs: small, fixed data over 2024-01-01..2024-01-11."""
    return SimulatorSettings()


class Simulator:
    """A Cognito-like token endpoint and the legacy REST API on loopback.

    `async with Simulator(settings) as sim:` or `await sim.start()` / `await sim.stop()`.
    """

    def __init__(self, settings: SimulatorSettings | None = None) -> None:
        self.settings = settings or demo_settings()
        self._state = SimState(self.settings)
        self._runner: web.AppRunner | None = None
        self._certificate: Certificate | None = None
        self._origin: str | None = None

    async def start(self) -> Simulator:
        settings = self.settings
        ssl_context = None
        if settings.tls:
            self._certificate = make_certificate()
            ssl_context = self._certificate.server_context()
        runner = web.AppRunner(build_app(self._state), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context).start()
        except BaseException:
            await runner.cleanup()
            self._drop_certificate()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        self._origin = f"{'https' if settings.tls else 'http'}://{host}:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._drop_certificate()

    def _drop_certificate(self) -> None:
        if self._certificate is not None:
            self._certificate.directory.cleanup()
            self._certificate = None

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def origin(self) -> str:
        if self._origin is None:
            raise RuntimeError("the simulator is not started")
        return self._origin

    @property
    def base_url(self) -> str:
        return f"{self.origin}/api/v1"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/oauth2/token"

    @property
    def control_url(self) -> str:
        return f"{self.origin}/_sim"

    @property
    def ca_pem_path(self) -> str | None:
        return str(self._certificate.cert_path) if self._certificate else None

    @property
    def counters(self) -> Counters:
        return self._state.counters

    @property
    def faults(self) -> Faults:
        return self._state.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._state.faults.update(faults.model_dump())

    def truth(
        self, resource: str, start: datetime | None = None, end: datetime | None = None
    ) -> dict[Any, Record]:
        """The records as served with updated_at in [start, end), keyed by primary key, in serving order."""
        return self._state.truth(resource, start, end)

    def touch(self, resource: str, ids: list[Any], at: datetime | None = None) -> int:
        """Modify records (new updated_at, default now; a visible change); returns how many."""
        return self._state.touch(resource, ids, at)

    def issued_tokens(self) -> list[str]:
        """The last 1,000 tokens issued, revoked or not."""
        return list(self._state.tokens.history)

    def revoke_tokens(self) -> None:
        """Every token issued so far answers 401 from now on."""
        self._state.tokens.revoke_all()

    def ready_line(self) -> dict[str, str | None]:
        """What the standalone command prints once serving."""
        return {
            "base_url": self.base_url,
            "token_url": self.token_url,
            "ca_pem_path": self.ca_pem_path,
            "control_url": self.control_url,
        }

