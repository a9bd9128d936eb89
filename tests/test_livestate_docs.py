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
            return await client.hgetall(key)  # type: ignore[no-any-return]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == dict(items)
