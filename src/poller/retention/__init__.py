"""Data lifecycle: what each storage level holds, and what may leave it.

:mod:`.manifest` checks a day's archive (the segments Postgres loaded against
what S3 lists), :mod:`.levels` reads what raw partitions and rollup tables
hold, :mod:`.policy` decides and drops (raw only once S3 has the whole day),
:mod:`.job` runs the policy once a day inside ``serve``.
"""
