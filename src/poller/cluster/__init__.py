"""Instances that share one fleet by themselves (``[cluster] enabled``).

Each ``serve`` holds a lease in Redis and renews it every heartbeat
(:mod:`~poller.cluster.store`); the live leases are the view; devices go to
members by rendezvous hashing over the view (:mod:`~poller.cluster.ring`);
every batch of ticks is fenced on the lease, read on the loop's clock
(:mod:`~poller.cluster.lease`); :mod:`~poller.cluster.membership` ties them
to the running service (join, view changes, graceful handoff).
"""
