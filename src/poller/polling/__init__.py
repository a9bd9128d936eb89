"""Polling: per-device schedules, the driver exchange, outcomes as data.

Roles, after Prometheus' scrape package: a :class:`~poller.polling.target.Target`
is a device's identity and health (what the API reads); a
:class:`~poller.polling.loop.DeviceLoop` owns one device's schedule, timeout
and back-off; the :class:`~poller.polling.pool.DevicePool` syncs wanted
devices with running loops and shares with them only a
:class:`~poller.polling.context.LoopContext` (wheel, clock, in-flight cap,
statistics, settings); the :class:`~poller.wheel.TimingWheel`
drives every tick from one timer.
"""
