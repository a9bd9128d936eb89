"""Sealing device credentials at rest with AES-256-GCM.

The key is 32 random bytes, given as URL-safe base64 in ``POLLER_SECRET_KEY``
or kept in ``STATE_DIR/secret.key`` (created mode 0600 on first use). A sealed
value records which key sealed it, so a wrong key is reported as such instead
of failing as a corrupt value. The device's id, driver and URL are bound in
as associated data: a sealed password copied onto another device, or left
behind when the device's URL or driver changed, does not open, so a stored
password is never sent to an address it was not given for.

    >>> box = SecretBox(generate_key())
    >>> sealed = box.seal("hunter2", cloud_id="0123ab", driver="eagle-local",
    ...                   url="http://192.168.1.50")
    >>> box.open(sealed, cloud_id="0123ab", driver="eagle-local", url="http://192.168.1.50")
    'hunter2'
    >>> box.open(sealed, cloud_id="0123ab", driver="eagle-local", url="http://10.9.9.9")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    poller.errors.SecretKeyError: sealed credentials of '0123ab' fail authentication (...)

Format 1 (before the URL was bound) bound the id only; such values still
open, and the registry seals them again in format 2 when it next reads or
writes them (:meth:`SecretBox.is_legacy`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from poller.errors import SecretKeyError

KEY_ENV = "POLLER_SECRET_KEY"
KEY_FILE_NAME = "secret.key"
_V1 = b"\x01"
"""Associated data: the cloud id. Opened, never written any more."""
_V2 = b"\x02"
"""Associated data: :func:`binding` of the cloud id, driver and URL."""
_NONCE_LEN = 12
_KEY_ID_LEN = 4


def generate_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii")


def decode_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip().encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SecretKeyError(f"{source}: not URL-safe base64 (make one with "
                             "`poller secret-key`)") from None
    if len(key) != 32:
        raise SecretKeyError(f"{source}: expected 32 bytes of key, got {len(key)}")
    return key


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"poller-key-id" + key).digest()[:_KEY_ID_LEN]


class SecretBox:
    __slots__ = ("_aead", "_key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SecretKeyError("a sealing key is 32 bytes")
        self._aead = AESGCM(key)
        self._key_id = key_id(key)

    @staticmethod
    def is_legacy(sealed: bytes) -> bool:
        """True for a value in format 1, bound to the device's id only: seal it
        again to bind its driver and URL too."""
        return sealed[:1] == _V1

    def seal(self, plaintext: str, *, cloud_id: str, driver: str, url: str | None) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"),
                                    binding(cloud_id, driver, url))
        return _V2 + self._key_id + nonce + sealed

    def open(self, sealed: bytes, *, cloud_id: str, driver: str, url: str | None) -> str:
        head = 1 + _KEY_ID_LEN + _NONCE_LEN
        version = sealed[:1]
        if len(sealed) < head + 16 or version not in (_V1, _V2):
            raise SecretKeyError(f"sealed credentials of {cloud_id!r} are corrupt "
                                 "(unknown format)")
        kid = sealed[1:1 + _KEY_ID_LEN]
        if kid != self._key_id:
            raise SecretKeyError(
                f"credentials of {cloud_id!r} were sealed with another key (key id "
                f"{kid.hex()}, this key is {self._key_id.hex()}): set {KEY_ENV} or "
                f"the key file to the key used at registration")
        aad = binding(cloud_id, driver, url) if version == _V2 else cloud_id.encode("utf-8")
        try:
            plain = self._aead.decrypt(sealed[1 + _KEY_ID_LEN:head], sealed[head:], aad)
        except InvalidTag:
            raise SecretKeyError(f"sealed credentials of {cloud_id!r} fail authentication "
                                 "(tampered with, moved from another device, or its driver "
                                 "or URL changed since its password was given)") from None
        return plain.decode("utf-8")


def binding(cloud_id: str, driver: str, url: str | None) -> bytes:
    """The associated data of a format-2 value: what the password was given for.

    A JSON array, so no choice of id, driver or URL can read as another's.
    The format byte leads it: a format-2 value relabelled as format 1 fails
    to open rather than opening with the id alone.

    >>> binding("00ce69", "eagle-cloud", None)
    b'\\x02["00ce69","eagle-cloud",null]'
    """
    return _V2 + json.dumps([cloud_id, driver, url], separators=(",", ":")).encode("utf-8")


def load_key(state_dir: Path, env: dict[str, str] | None = None, *, create: bool = True,
             sealed: int = 0) -> bytes:
    """The sealing key: ``POLLER_SECRET_KEY``, else the state directory's key file.

    With ``create`` the key file is made (mode 0600, exclusively) if missing,
    but only while ``sealed`` (how many credentials the registry holds sealed)
    is 0: a new key opens none of them, so a lost key file is an error then.
    """
    env = dict(os.environ) if env is None else env
    if env.get(KEY_ENV):
        return decode_key(env[KEY_ENV], KEY_ENV)
    path = state_dir / KEY_FILE_NAME
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        if sealed:
            raise SecretKeyError(
                f"{path} is missing, and the registry holds {sealed} sealed device "
                "credential(s) that only the key which sealed them opens: restore that "
                f"key file (mode 0600) or set {KEY_ENV}; a new key is made only while "
                "nothing is sealed (remove-user those devices to start over)") from None
        if not create:
            raise SecretKeyError(f"no sealing key: set {KEY_ENV} or create {path}") from None
    state_dir.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read_key_file(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(encode_key(key) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SecretKeyError(f"{path} is readable by others (mode {mode:o}): "
                             f"run `chmod 600 {path}`")
    return decode_key(path.read_text(encoding="ascii"), str(path))
