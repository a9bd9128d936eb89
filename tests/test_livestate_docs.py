"""The batched encoding of latest-reading documents equals the one-at-a-time one."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from poller.ingest.livestate import reading_doc, reading_docs
from poller.reading import Reading
from tests.stackfix import RunningStack

num = st.none() | st.floats(width=64)
readings = st.builds(Reading, st.integers(1, 2**40), st.floats(0, 4e9), num,
                     st.floats(0, 4e9), num, num, num, num, st.text(max_size=8))


@given(st.lists(readings, max_size=30))
def test_batch_equals_one_at_a_time(rows: list[Reading]) -> None:
    docs = reading_docs(rows)
    assert docs == [reading_doc(r) for r in rows]
    for doc, r in zip(docs, rows, strict=True):
        assert orjson.loads(doc)["tick_at"] == r.tick_at


def _raw(found: dict[bytes | str, bytes | str]) -> dict[bytes, bytes]:
    """A hash as these clients read it (no decode_responses): all bytes, which
    redis' types cannot tell from str."""
    raw = {k: v for k, v in found.items() if isinstance(k, bytes) and isinstance(v, bytes)}
    assert len(raw) == len(found), "a str in a hash read without decode_responses"
    return raw


def test_hset_command_is_what_redis_reads(stack: RunningStack) -> None:
    import asyncio
    import uuid

    import redis.asyncio as aioredis

    from poller.ingest.livestate import hset_command

    key = f"test:{uuid.uuid4().hex}".encode()
    items = [(b"a", b"1"), (b"f\r\nx", b'{"v": "\\r\\n"}'), ("é".encode(), b"")]

    async def run() -> dict[bytes, bytes]:
        client = aioredis.from_url(stack.info.redis_url)
        try:
            conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.send_packed_command([hset_command(key, items)])
                assert await conn.read_response() == 3
            finally:
                await client.connection_pool.release(conn)
            return _raw(await client.hgetall(key))
        finally:
            await client.aclose()

    assert asyncio.run(run()) == dict(items)


def test_a_large_flush_lets_the_loop_run_and_writes_everything(stack: RunningStack) -> None:
    """Thousands of changed devices are written in steps with turns of the
    event loop between them (polls due meanwhile start on time), and every
    latest reading and status document arrives."""
    import asyncio
    from datetime import UTC, datetime

    import redis.asyncio as aioredis

    from poller import keys
    from poller.ingest.livestate import _STEP, LiveState
    from poller.polling.target import Target
    from poller.registry import DeviceRecord
    from tests.rows import make_rows

    n = 4 * _STEP + 7
    now = datetime.now(UTC)
    targets = []
    for r in make_rows(n, 1_764_000_000.0):
        t = Target(DeviceRecord(r.device_id, r.cloud_id, "a@example.com", "eagle-cloud", None,
                                {}, 6.0, True, now, now))
        t.latest = r
        targets.append(t)
    # A database of its own on the shared server: these keys are the real ones.
    url = stack.info.redis_url.rsplit("/", 1)[0] + "/9"

    turns = 0
    turns_at_send: list[int] = []

    class Recording(LiveState):
        async def _send(self, commands: list[bytes]) -> None:
            turns_at_send.append(turns)
            await super()._send(commands)

    async def run() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        nonlocal turns
        dirty: list[Target] = []

        def take() -> list[Target]:
            taken = dirty[:]
            dirty.clear()
            return taken

        live = Recording(url, lambda: targets, take)
        client = aioredis.from_url(url)
        try:
            await client.flushdb()
            await live.start()  # the first flush writes the fleet
            await client.flushdb()
            for t in targets:  # every device changed state since
                t.state_changed = True
            dirty.extend(targets)
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal turns
                while not done.is_set():
                    turns += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            turns_at_send.clear()
            turns = 0
            await live.flush()
            done.set()
            await task
            return _raw(await client.hgetall(keys.LATEST)), _raw(await client.hgetall(keys.STATE))
        finally:
            await live.close()
            await client.flushdb()
            await client.aclose()

    latest, state = asyncio.run(run())
    # The loop turned between the steps of building the commands, before a
    # byte went to Redis: two passes (readings, status documents) of n / _STEP.
    assert turns_at_send and turns_at_send[0] >= 2 * (n // _STEP)
    assert len(latest) == n and len(state) == n
    assert all(t.cloud_id.encode() in latest and t.cloud_id.encode() in state
               for t in targets)


def test_counters_continue_from_redis_for_own_devices_only(stack: RunningStack) -> None:
    """What Redis counted for a device before this process (an earlier run)
    is added to its counters once, before its first write; entries of other
    shards' devices are neither read into memory nor touched."""
    import asyncio
    from datetime import UTC, datetime

    import orjson
    import redis.asyncio as aioredis
    from redis.typing import EncodableT

    from poller import keys
    from poller.ingest.livestate import LiveState
    from poller.polling.target import Target
    from poller.registry import DeviceRecord
    from tests.rows import make_rows

    now = datetime.now(UTC)
    (row,) = make_rows(1, 1_764_000_000.0)
    mine = Target(DeviceRecord(row.device_id, row.cloud_id, "a@example.com", "eagle-cloud",
                               None, {}, 6.0, True, now, now))
    mine.latest = row
    mine.readings = 3
    url = stack.info.redis_url.rsplit("/", 1)[0] + "/9"
    before = {"cloud_id": row.cloud_id, "state": "ok", "total_events_logged": 7,
              "first_timestamp": 1_700_000_000.0, "failures": {"timeout": 2}}
    # Typed as hset takes it (its Mapping's key type is invariant).
    others: dict[EncodableT, EncodableT] = {
        f"other-{i}": orjson.dumps({"total_events_logged": i}) for i in range(300)}

    async def run() -> tuple[dict[str, object], dict[bytes, bytes]]:
        client = aioredis.from_url(url)
        live = LiveState(url, lambda: [mine], lambda: [mine])
        try:
            await client.flushdb()
            stored = {row.cloud_id: orjson.dumps(before), **others}
            await client.hset(keys.STATE, mapping=stored)
            await live.start()
            mine.readings += 1  # one more poll, then the next flush
            mine.state_changed = True
            await live.flush()
            written = await client.hget(keys.STATE, row.cloud_id)
            assert written is not None
            doc = orjson.loads(written)
            rest = _raw(await client.hgetall(keys.STATE))
            # Nothing of the other devices stays in the writer's memory.
            held = [v for v in vars(live).values() if isinstance(v, dict)]
            assert not [d for d in held if "other-0" in d or b"other-0" in d]
            return doc, rest
        finally:
            await live.close()
            await client.flushdb()
            await client.aclose()

    doc, rest = asyncio.run(run())
    assert mine.counted
    assert doc["total_events_logged"] == 7 + 4  # folded once, not on every write
    assert doc["first_timestamp"] == 1_700_000_000.0
    assert doc["failures"] == {"timeout": 2}
    assert {k.decode(): v for k, v in rest.items() if k != row.cloud_id.encode()} == others


def test_a_cluster_member_letting_a_device_go_writes_no_stopped_document(
        stack: RunningStack) -> None:
    """In a cluster the member taking a device writes its state; the one
    letting it go must not overwrite it with 'stopped' when that device's
    counters come round (the device waited for its turn when it stopped)."""
    import asyncio
    from datetime import UTC, datetime

    import redis.asyncio as aioredis

    from poller import keys
    from poller.ingest.livestate import LiveState
    from poller.polling.target import DeviceState, Target
    from poller.registry import DeviceRecord
    from tests.rows import make_rows

    now = datetime.now(UTC)
    url = stack.info.redis_url.rsplit("/", 1)[0] + "/9"

    async def run(write_stopped: bool) -> set[bytes]:
        targets = []
        for r in make_rows(2, 1_764_000_000.0):
            t = Target(DeviceRecord(r.device_id, r.cloud_id, "a@example.com", "eagle-cloud",
                                    None, {}, 6.0, True, now, now))
            t.latest = r
            t.state = DeviceState.OK
            targets.append(t)
        dirty: list[Target] = []

        def take() -> list[Target]:
            taken = dirty[:]
            dirty.clear()
            return taken

        live = LiveState(url, lambda: targets, take, counters_every_s=1e-6,
                         write_stopped=write_stopped)
        client = aioredis.from_url(url)
        try:
            await client.flushdb()
            await live.start()  # the first flush writes the fleet
            await client.flushdb()
            dirty.extend(targets)  # polled since: counters due, no state change
            targets[1].state = DeviceState.STOPPED  # let go meanwhile
            await live.flush()
            return set(_raw(await client.hgetall(keys.STATE)))
        finally:
            await live.close()
            await client.flushdb()
            await client.aclose()

    ids = [r.cloud_id.encode() for r in make_rows(2, 1_764_000_000.0)]
    assert asyncio.run(run(write_stopped=False)) == {ids[0]}
    assert asyncio.run(run(write_stopped=True)) == set(ids)
