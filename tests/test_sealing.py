"""Sealing credentials: round trip, wrong key, tampering, the binding to the
device's id, driver and URL, format-1 values, key file rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from poller import sealing
from poller.errors import SecretKeyError

LOCAL = {"cloud_id": "00ce69", "driver": "eagle-local", "url": "http://192.168.1.50"}


def legacy_seal(key: bytes, plaintext: str, cloud_id: str) -> bytes:
    """A value as format 1 sealed it (before the URL was bound): the id only."""
    nonce = os.urandom(12)
    return (b"\x01" + sealing.key_id(key) + nonce
            + AESGCM(key).encrypt(nonce, plaintext.encode(), cloud_id.encode()))


def test_round_trip_and_randomised_nonce() -> None:
    box = sealing.SecretBox(sealing.generate_key())
    a = box.seal("correct horse", **LOCAL)
    b = box.seal("correct horse", **LOCAL)
    assert a != b  # fresh nonce each time
    assert b"correct horse" not in a
    assert box.open(a, **LOCAL) == "correct horse"
    assert not box.is_legacy(a)


def test_wrong_key_is_named_not_garbage() -> None:
    sealed = sealing.SecretBox(sealing.generate_key()).seal("pw", **LOCAL)
    other = sealing.SecretBox(sealing.generate_key())
    with pytest.raises(SecretKeyError, match="sealed with another key"):
        other.open(sealed, **LOCAL)


def test_moved_or_tampered_value_fails_authentication() -> None:
    box = sealing.SecretBox(sealing.generate_key())
    sealed = box.seal("pw", **LOCAL)
    with pytest.raises(SecretKeyError, match="fail authentication"):
        box.open(sealed, **{**LOCAL, "cloud_id": "00ce6a"})
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretKeyError, match="fail authentication"):
        box.open(flipped, **LOCAL)
    with pytest.raises(SecretKeyError, match="corrupt"):
        box.open(b"\x02short", **LOCAL)
    with pytest.raises(SecretKeyError, match="corrupt"):
        box.open(b"\x07" + sealed[1:], **LOCAL)


@pytest.mark.parametrize("change", [
    {"url": "http://169.254.169.254"},        # another host
    {"url": "http://192.168.1.50:6379"},      # the same host, another port
    {"url": "http://192.168.1.50/"},          # any other spelling is another URL
    {"url": None},                            # the driver's default endpoint
    {"driver": "http-json"},                  # another driver, the same URL
])
def test_a_secret_does_not_open_for_another_url_or_driver(change: dict[str, str | None]) -> None:
    box = sealing.SecretBox(sealing.generate_key())
    sealed = box.seal("install-code", **LOCAL)
    with pytest.raises(SecretKeyError, match="driver or URL changed"):
        box.open(sealed, **{**LOCAL, **change})  # type: ignore[arg-type]
    assert box.open(sealed, **LOCAL) == "install-code"


def test_the_binding_cannot_be_confused() -> None:
    # Each field is its own JSON string: no id, driver or URL can read as another's.
    assert sealing.binding("a", "b,c", None) != sealing.binding("a,b", "c", None)
    assert sealing.binding("a", "b", None) != sealing.binding("a", "b", "")
    assert sealing.binding("a", "b", "null") != sealing.binding("a", "b", None)


def test_format_1_values_open_by_id_and_a_relabelled_value_does_not() -> None:
    key = sealing.generate_key()
    box = sealing.SecretBox(key)
    old = legacy_seal(key, "pw", "00ce69")
    assert box.is_legacy(old)
    # Format 1 bound the id only: it opens whatever the driver and URL.
    assert box.open(old, **LOCAL) == "pw"
    assert box.open(old, **{**LOCAL, "url": "http://10.0.0.9"}) == "pw"
    with pytest.raises(SecretKeyError, match="fail authentication"):
        box.open(old, **{**LOCAL, "cloud_id": "00ce6a"})
    # A format-2 value relabelled as format 1 (to be opened by id alone) fails.
    new = box.seal("pw", **LOCAL)
    with pytest.raises(SecretKeyError, match="fail authentication"):
        box.open(b"\x01" + new[1:], **LOCAL)


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
