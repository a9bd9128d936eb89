"""The batched encoding of latest-reading documents equals the one-at-a-time one."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from poller.ingest.livestate import reading_doc, reading_docs
from poller.reading import Reading

num = st.none() | st.floats(width=64)
readings = st.builds(Reading, st.integers(1, 2**40), st.floats(0, 4e9), num,
                     st.floats(0, 4e9), num, num, num, num, st.text(max_size=8))


@given(st.lists(readings, max_size=30))
def test_batch_equals_one_at_a_time(rows: list[Reading]) -> None:
    docs = reading_docs(rows)
    assert docs == [reading_doc(r) for r in rows]
    for doc, r in zip(docs, rows, strict=True):
        assert orjson.loads(doc)["tick_at"] == r.tick_at
