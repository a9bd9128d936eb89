"""Sealing credentials: round trip, wrong key, tampering, key file rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from poller import sealing
from poller.errors import SecretKeyError


def test_round_trip_and_randomised_nonce() -> None:
    box = sealing.SecretBox(sealing.generate_key())
    a = box.seal("correct horse", context="00ce69")
    b = box.seal("correct horse", context="00ce69")
    assert a != b  # fresh nonce each time
    assert b"correct horse" not in a
    assert box.open(a, context="00ce69") == "correct horse"


def test_wrong_key_is_named_not_garbage() -> None:
    sealed = sealing.SecretBox(sealing.generate_key()).seal("pw", context="00ce69")
    other = sealing.SecretBox(sealing.generate_key())
    with pytest.raises(SecretKeyError, match="sealed with another key"):
        other.open(sealed, context="00ce69")


def test_moved_or_tampered_value_fails_authentication() -> None:
    box = sealing.SecretBox(sealing.generate_key())
    sealed = box.seal("pw", context="00ce69")
    with pytest.raises(SecretKeyError, match="fail authentication"):
        box.open(sealed, context="00ce6a")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretKeyError, match="fail authentication"):
        box.open(flipped, context="00ce69")
    with pytest.raises(SecretKeyError, match="corrupt"):
        box.open(b"\x02short", context="00ce69")


def test_key_file_created_0600_once(tmp_path: Path) -> None:
    key = sealing.load_key(tmp_path / "state", env={})
    path = tmp_path / "state" / sealing.KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sealing.load_key(tmp_path / "state", env={}) == key


def test_env_key_wins_and_is_validated(tmp_path: Path) -> None:
    key = sealing.generate_key()
    assert sealing.load_key(tmp_path, env={sealing.KEY_ENV: sealing.encode_key(key)}) == key
    with pytest.raises(SecretKeyError, match="base64"):
        sealing.load_key(tmp_path, env={sealing.KEY_ENV: "!!!"})
    with pytest.raises(SecretKeyError, match="32 bytes"):
        sealing.load_key(tmp_path, env={sealing.KEY_ENV: sealing.encode_key(b"x" * 16)})


def test_world_readable_key_file_refused(tmp_path: Path) -> None:
    sealing.load_key(tmp_path, env={})
    os.chmod(tmp_path / sealing.KEY_FILE_NAME, 0o644)
    with pytest.raises(SecretKeyError, match="readable by others"):
        sealing.load_key(tmp_path, env={})


def test_missing_key_without_create(tmp_path: Path) -> None:
    with pytest.raises(SecretKeyError, match="no sealing key"):
        sealing.load_key(tmp_path, env={}, create=False)
