"""Deterministic records of the simulated legacy API, computed on demand.

A base record is a pure function of (seed, resource, index), so nothing is
pre-generated: a million-record resource starts instantly and costs no memory.
Base record `i` has updated_at = start + i * span // count (in the resource's
clock ticks), so a time filter maps to an index range by arithmetic. Touched
records live in a small overlay that `Selection` merges back in, keeping the
(updated_at, key) order every pagination style relies on.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from itertools import accumulate
from typing import Any

import orjson

Record = dict[str, Any]
Key = tuple[int, int]  # (updated_at ticks, index): the serving order

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_US = timedelta(microseconds=1)
PREBUILD_CHUNK = 10_000
_LOW_POOL = 1 << 96  # refill before the remainders of draws (n < 2**32) get biased


class Dice:
    """Draws from a 512-bit keyed hash of one record's index.

    A fresh hash per record (instead of a shared PRNG) is what makes record i
    computable without generating records 0..i-1.
    """

    __slots__ = ("_key", "_msg", "_pool", "_round")

    def __init__(self, key: bytes, index: int) -> None:
        self._key = key
        self._msg = index.to_bytes(8, "little")
        self._round = 0
        self._pool = self._hash()

    def _hash(self) -> int:
        message = self._msg + self._round.to_bytes(4, "little")
        digest = hashlib.blake2b(message, key=self._key, digest_size=64).digest()
        return int.from_bytes(digest, "little")

    def below(self, n: int) -> int:
        """A number in [0, n), for n < 2**32."""
        if self._pool < _LOW_POOL:
            self._round += 1
            self._pool = self._hash()
        self._pool, value = divmod(self._pool, n)
        return value

    def pick(self, choices: Sequence[Any]) -> Any:
        return choices[self.below(len(choices))]


# --- time ------------------------------------------------------------------


def as_utc(moment: datetime) -> datetime:
    """Naive datetimes are UTC, as everywhere in etl."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def to_us(moment: datetime) -> int:
    """Exact microseconds since the epoch."""
    return (as_utc(moment) - EPOCH) // _US


@lru_cache(maxsize=65536)
def day_iso(days: int) -> str:
    """'YYYY-MM-DD' of a day number since the epoch (cached: pages share days)."""
    return date.fromordinal(_EPOCH_ORDINAL + days).isoformat()


@lru_cache(maxsize=65536)
def _hour(hours: int) -> str:
    """'YYYY-MM-DDTHH:' of an hour number since the epoch."""
    days, hour = divmod(hours, 24)
    return f"{day_iso(days)}T{hour:02d}:"


_MINUTES_SECONDS = [f"{m:02d}:{s:02d}" for m in range(60) for s in range(60)]


def _clock(seconds: int) -> str:
    """'YYYY-MM-DDTHH:MM:SS' from two lookups: formatting is the hot path of a page."""
    hours, rem = divmod(seconds, 3600)
    return _hour(hours) + _MINUTES_SECONDS[rem]


def iso_z(seconds: int) -> str:
    return _clock(seconds) + "Z"


def iso_utc_offset(seconds: int) -> str:
    return _clock(seconds) + "+00:00"


def iso_ms_z(millis: int) -> str:
    seconds, ms = divmod(millis, 1000)
    return f"{_clock(seconds)}.{ms:03d}Z"


def iso_local(seconds: int, offset_minutes: int) -> str:
    """The same instant written in a local time with its offset."""
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{_clock(seconds + offset_minutes * 60)}{sign}{hours:02d}:{minutes:02d}"


def money(cents: int) -> str:
    """Decimal amounts travel as strings with two places, like the legacy API."""
    return _MONEY[cents] if cents < len(_MONEY) else f"{cents // 100}.{cents % 100:02d}"


_MONEY = [f"{cents // 100}.{cents % 100:02d}" for cents in range(20_000)]


# --- record builders -------------------------------------------------------

NAMES = (
    "Zoë Ångström",
    "José Núñez",
    "François d'Aubigné",
    'Dwayne "The Rock" Johnson',
    "Björk Guðmundsdóttir",
    "李小龍",
    "山田 太郎",
    "김민준",
    "Łukasz Żółć",
    "Antonín Dvořák",
    "Søren Kierkegaard",
    "Ólafur Arnalds",
    "Émilie Dupré 🎉",
    "Άλκηστις Παπαδοπούλου",
    "Анна Каренина",
    "O'Brien 🍀",
    "Plain Smith",
    "Ngozi Okonjo-Iweala",
)
CITIES = (
    ("Zürich", "CH"),
    ("São Paulo", "BR"),
    ("Kraków", "PL"),
    ("東京", "JP"),
    ("Reykjavík", "IS"),
    ("Málaga", "ES"),
    ("Berlin", "DE"),
    ("Montréal", "CA"),
    ("Lyon", "FR"),
    ("Cork", "IE"),
)
DOMAINS = ("example.com", "example.org", "mail.example.net")
STATUSES = ("new", "paid", "shipped", "cancelled")
NOTES = ("leave at the door", "gift — wrap it", "fragile: glass", "rückruf erbeten", "")
VIP_VALUES = ("true", "false", 1, 0)
EVENT_KINDS = ("page_view", "click", "signup", "purchase", "error")
TAGS = ("new", "sale", "eco", "bundle", "limited", "refurb")
PRODUCTS = ("Widget", "Gadget", "Gizmo", "Sprocket", "Doohickey", "Thingamajig")
ADJECTIVES = ("Deluxe", "Mini", "Pro", "Classic", "Ultra", "Café Edition")


class Context:
    """What a record may refer to outside its own resource, and how keys look."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.customers = max(1, counts["customers"])
        self.orders = max(1, counts["orders"])
        self.products = max(1, counts["products"])
        # zero-padded keys: string order is number order whatever the count
        self.sku = f"SKU-{{:0{max(4, len(str(counts['products'])))}d}}".format
        self.event_id = f"evt-{{:0{max(6, len(str(counts['events'])))}d}}".format


def build_order(d: Dice, i: int, ticks: int, ctx: Context) -> Record:
    lines = []
    total = 0
    for _ in range(1 + d.below(3)):
        qty = 1 + d.below(5)
        cents = 99 + d.below(19_900)
        total += qty * cents
        lines.append({"sku": ctx.sku(1 + d.below(ctx.products)), "qty": qty, "price": money(cents)})
    record: Record = {
        "id": i + 1,
        "customer_id": 1 + d.below(ctx.customers),
        "total": money(total),
        "currency": "EUR",
        "status": d.pick(STATUSES),
        "updated_at": iso_z(ticks),
        "lines": lines,
        "customer": {"name": d.pick(NAMES)},
        "note": d.pick(NOTES) if d.below(3) == 0 else None,
        "version": 1,
    }
    if d.below(97) == 0:
        _spoil_order(record, d.below(4))
    return record


def _spoil_order(record: Record, how: int) -> None:
    """About 1 order in 97 is broken on purpose, so rejects can be tested."""
    if how == 0:
        record["total"] = "n/a"
    elif how == 1:
        record["customer_id"] = "abc"
    elif how == 2:
        del record["id"]
    else:
        record["lines"] = "[corrupted]"


def build_customer(d: Dice, i: int, ticks: int, ctx: Context) -> Record:
    city, country = d.pick(CITIES)
    return {
        "id": i + 1,
        "email": f"user{i + 1}@{d.pick(DOMAINS)}",
        "name": d.pick(NAMES),
        "vip": d.pick(VIP_VALUES),
        "created_on": day_iso(19358 + d.below(365)),  # a day of 2023
        "updated_at": ticks,
        "address": {"city": city, "country": country},
    }


def build_event(d: Dice, i: int, ticks: int, ctx: Context) -> Record:
    occurred = ticks // 1000 - d.below(3600)
    local = d.below(3) == 0
    return {
        "event_id": ctx.event_id(i + 1),
        "kind": d.pick(EVENT_KINDS),
        "payload": {
            "session": f"s-{d.below(1 << 32):08x}",
            "attrs": {
                "count": d.below(1000),
                "ratio": d.below(10_001) / 10_000,
                "ok": d.below(2) == 1,
                "tags": [d.pick(TAGS) for _ in range(d.below(4))],
            },
            "context": {
                "device": {"os": d.pick(("linux", "ios", "android")), "version": [d.below(20), d.below(10)]},
                "geo": None if d.below(2) else {"city": d.pick(CITIES)[0], "precision": 1.5},
            },
        },
        "occurred_at": iso_local(occurred, 120) if local else iso_z(occurred),
        "updated_at": iso_ms_z(ticks),
    }


def build_payment(d: Dice, i: int, ticks: int, ctx: Context) -> Record:
    paid = d.below(10) != 0
    return {
        "payment_id": i + 1,
        "order_id": 1 + d.below(ctx.orders),
        "amount": money(100 + d.below(50_000)),
        "paid": paid,
        "paid_on": day_iso(ticks // 86400 - d.below(3)) if paid else None,
        "updated_at": iso_utc_offset(ticks),
    }


def build_product(d: Dice, i: int, ticks: int, ctx: Context) -> Record:
    return {
        "sku": ctx.sku(i + 1),
        "name": f"{d.pick(PRODUCTS)} {d.pick(ADJECTIVES)}",
        "price": money(199 + d.below(9_800)),
        "tags": sorted({d.pick(TAGS) for _ in range(d.below(4))}),
        "updated_at": iso_z(ticks),
    }


# --- touches ---------------------------------------------------------------


def touch_order(record: Record, ticks: int) -> None:
    status = record.get("status")
    record["status"] = STATUSES[(STATUSES.index(status) + 1) % len(STATUSES)] if status in STATUSES else "new"
    record["version"] = record.get("version", 1) + 1
    record["updated_at"] = iso_z(ticks)


def touch_customer(record: Record, ticks: int) -> None:
    record["vip"] = "false" if record["vip"] in ("true", 1) else "true"
    record["updated_at"] = ticks


def touch_event(record: Record, ticks: int) -> None:
    record["payload"]["revised"] = record["payload"].get("revised", 0) + 1
    record["updated_at"] = iso_ms_z(ticks)


def touch_payment(record: Record, ticks: int) -> None:
    record["paid"] = True
    record["paid_on"] = day_iso(ticks // 86400)
    record["updated_at"] = iso_utc_offset(ticks)


def touch_product(record: Record, ticks: int) -> None:
    cents = int(record["price"].replace(".", "")) + 100
    record["price"] = money(cents)
    record["updated_at"] = iso_z(ticks)


# --- resources -------------------------------------------------------------


def _integer_key(ctx: Context, number: int) -> int:
    return number


def _event_key(ctx: Context, number: int) -> str:
    return ctx.event_id(number)


def _sku_key(ctx: Context, number: int) -> str:
    return ctx.sku(number)


@dataclass(frozen=True)
class Kind:
    """What differs between resources: key, clock resolution, record shape."""

    name: str
    ticks_per_s: int
    default_count: int
    build: Callable[[Dice, int, int, Context], Record]
    touch: Callable[[Record, int], None]
    key: Callable[[Context, int], int | str] = _integer_key  # of the 1-based record number
    key_prefix: str = ""  # of string keys ("evt-"); "" = integer key


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("orders", 1, 1000, build_order, touch_order),
        Kind("customers", 1, 200, build_customer, touch_customer),
        Kind("events", 1000, 500, build_event, touch_event, _event_key, "evt-"),
        Kind("payments", 1, 300, build_payment, touch_payment),
        Kind("products", 1, 20, build_product, touch_product, _sku_key, "SKU-"),
    )
}


@dataclass(frozen=True)
class Timeline:
    """Base record i sits at start + i * span // count ticks."""

    start: int
    span: int
    count: int

    def at(self, i: int) -> int:
        return self.start + i * self.span // self.count

    def first_at_or_after(self, ticks: int) -> int:
        """The smallest i with at(i) >= ticks (count when none)."""
        offset = ticks - self.start
        if offset <= 0:
            return 0
        return min(self.count, -(-offset * self.count // self.span))


class Dataset:
    """One resource: base records by arithmetic plus an overlay of touched ones."""

    def __init__(
        self, kind: Kind, seed: int, count: int, start: datetime, end: datetime, ctx: Context
    ) -> None:
        self.kind = kind
        self.count = count
        first, last = self.floor_ticks(to_us(start)), self.floor_ticks(to_us(end))
        self.timeline = Timeline(first, last - first, count)
        self._ctx = ctx
        self._hash_key = hashlib.blake2b(f"{seed}/{kind.name}".encode(), digest_size=32).digest()
        self._overlay: dict[int, tuple[int, Record]] = {}
        self._moved: list[Key] = []  # sorted keys of touched records
        self._touched: list[int] = []  # sorted indices of touched records
        self._encoded: tuple[bytes, array[int]] | None = None  # base records' JSON and their ends, after prebuild()

    def ceil_ticks(self, us: int) -> int:
        """Filter bounds round up: ticks >= x  <=>  ticks >= ceil(x)."""
        return -(-us * self.kind.ticks_per_s // 1_000_000)

    def floor_ticks(self, us: int) -> int:
        return us * self.kind.ticks_per_s // 1_000_000

    def ticks_of(self, i: int) -> int:
        hit = self._overlay.get(i)
        return hit[0] if hit else self.timeline.at(i)

    def record(self, i: int) -> Record:
        hit = self._overlay.get(i)
        if hit:
            return hit[1]
        return self._base(i)

    def _base(self, i: int) -> Record:
        return self.kind.build(Dice(self._hash_key, i), i, self.timeline.at(i), self._ctx)

    def records(self, indices: Iterable[int]) -> list[Record]:
        return [self.record(i) for i in indices]

    def prebuild(self) -> None:
        """Encode every base record now, so that serving a page is a slice of ready bytes.

        For benchmarks: building and encoding a record costs the simulator ~9 us, which on a
        small machine is CPU taken from the etl process being measured. One buffer and its
        offsets, not a bytes object per record: orjson's output keeps ~4 KB of capacity each.
        """
        chunks: list[bytes] = []
        ends = array("q", [0])
        for first in range(0, self.count, PREBUILD_CHUNK):
            encoded = [orjson.dumps(self._base(i)) for i in range(first, min(first + PREBUILD_CHUNK, self.count))]
            ends.extend(list(accumulate(map(len, encoded), initial=ends[-1]))[1:])
            chunks.append(b"".join(encoded))
        self._encoded = (b"".join(chunks), ends)

    def served(self, indices: Iterable[int]) -> list[Any]:
        """The records of a page as they go into its body: prebuilt ones as orjson fragments."""
        if self._encoded is None:
            return self.records(indices)
        blob, ends = self._encoded
        overlay = self._overlay
        return [overlay[i][1] if i in overlay else orjson.Fragment(blob[ends[i]:ends[i + 1]]) for i in indices]

    def key_of(self, i: int) -> int | str:
        """The primary key record i has (or would have, for a record spoiled without one)."""
        return self.kind.key(self._ctx, i + 1)

    def index_of(self, key: Any) -> int:
        """The index of a primary key value; integer keys may come as digit strings (JSON)."""
        text = str(key)
        prefix = self.kind.key_prefix
        digits = text.removeprefix(prefix)
        if not digits.isdigit() or not text.startswith(prefix):
            raise KeyError(key)
        index = int(digits) - 1
        if not 0 <= index < self.count or (prefix and self.key_of(index) != text):
            raise KeyError(key)
        return index

    def touch(self, keys: Iterable[Any], at: datetime) -> int:
        """Give records a new updated_at and a visible change; they move in filters."""
        indices = [self.index_of(key) for key in keys]  # all or nothing
        ticks = self.floor_ticks(to_us(at))
        for i in indices:
            record = orjson.loads(orjson.dumps(self.record(i)))  # deep copy
            previous = self._overlay.get(i)
            if previous:
                self._moved.remove((previous[0], i))
            else:
                bisect.insort(self._touched, i)
            self.kind.touch(record, ticks)
            self._overlay[i] = (ticks, record)
            bisect.insort(self._moved, (ticks, i))
        return len(indices)

    def select(self, lo_us: int | None = None, hi_us: int | None = None) -> Selection:
        """Records with lo <= updated_at < hi (None = unbounded), in serving order."""
        lo = None if lo_us is None else self.ceil_ticks(lo_us)
        hi = None if hi_us is None else self.ceil_ticks(hi_us)
        return Selection(self, lo, hi)

    def truth(self, lo_us: int | None = None, hi_us: int | None = None) -> dict[Any, Record]:
        selection = self.select(lo_us, hi_us)
        return {self.key_of(i): self.record(i) for i in selection.indices(0, len(selection))}


class Selection:
    """A filtered, ordered view: base index range [a, b) minus touched, merged with moved.

    Positions and keyset ranks cost O(log k + k) for k touched records, so
    paging stays fast on a million records.
    """

    def __init__(self, dataset: Dataset, lo: int | None, hi: int | None) -> None:
        timeline = dataset.timeline
        self._ticks_of = dataset.ticks_of
        self._first = timeline.first_at_or_after
        self._a = 0 if lo is None else timeline.first_at_or_after(lo)
        self._b = max(self._a, timeline.count if hi is None else timeline.first_at_or_after(hi))
        touched = dataset._touched
        self._excluded = touched[bisect.bisect_left(touched, self._a) : bisect.bisect_left(touched, self._b)]
        self._excluded_set = frozenset(self._excluded)
        moved = dataset._moved
        start = 0 if lo is None else bisect.bisect_left(moved, (lo, -1))
        stop = len(moved) if hi is None else bisect.bisect_left(moved, (hi, -1))
        self._moved = moved[start:stop]
        self._len = self._b - self._a - len(self._excluded) + len(self._moved)

    def __len__(self) -> int:
        return self._len

    def rank(self, key: Key) -> int:
        """How many selected records sort before `key`: where a keyset cursor resumes."""
        return self._base_rank(key) + bisect.bisect_left(self._moved, key)

    def indices(self, start: int, n: int) -> Sequence[int]:
        """Indices of the records at positions [start, start + n)."""
        if not self._moved and not self._excluded:
            first = min(self._a + start, self._b)
            return range(first, min(first + n, self._b))
        moved = self._moved
        j = bisect.bisect_left(range(len(moved)), start, key=lambda k: k + self._base_rank(moved[k]))
        i = self._nth_base(start - j)
        out: list[int] = []
        while len(out) < n:
            if j < len(moved) and (i >= self._b or moved[j] < (self._ticks_of(i), i)):
                out.append(moved[j][1])
                j += 1
            elif i < self._b:
                out.append(i)
                i = self._next_base(i + 1)
            else:
                break
        return out

    def _base_rank(self, key: Key) -> int:
        """Untouched base records in [a, b) that sort before `key`."""
        ticks, index = key
        cut = max(self._first(ticks), min(self._first(ticks + 1), index))
        cut = min(max(cut, self._a), self._b)
        return cut - self._a - bisect.bisect_left(self._excluded, cut)

    def _nth_base(self, rank: int) -> int:
        """Index of the untouched base record of this rank (b when past the end)."""
        i = self._a + rank
        for excluded in self._excluded:
            if excluded > i:
                break
            i += 1
        return min(i, self._b)

    def _next_base(self, i: int) -> int:
        while i in self._excluded_set:
            i += 1
        return min(i, self._b)


def build_datasets(
    seed: int, counts: Mapping[str, int], start: datetime, end: datetime
) -> dict[str, Dataset]:
    ctx = Context(counts)
    return {name: Dataset(kind, seed, counts[name], start, end, ctx) for name, kind in KINDS.items()}
