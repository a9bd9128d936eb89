"""Sealing device credentials at rest with AES-256-GCM.

The key is 32 random bytes, given as URL-safe base64 in ``POLLER_SECRET_KEY``
or kept in ``STATE_DIR/secret.key`` (created mode 0600 on first use). A sealed
value records which key sealed it, so a wrong key is reported as such instead
of failing as a corrupt value. The device's external id is bound in as
associated data: a sealed password copied onto another device does not open.

    >>> box = SecretBox(generate_key())
    >>> box.open(box.seal("hunter2", context="0123ab"), context="0123ab")
    'hunter2'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from poller.errors import SecretKeyError

KEY_ENV = "POLLER_SECRET_KEY"
KEY_FILE_NAME = "secret.key"
_VERSION = b"\x01"
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

    @property
    def key_id_hex(self) -> str:
        return self._key_id.hex()

    def seal(self, plaintext: str, *, context: str) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return _VERSION + self._key_id + nonce + sealed

    def open(self, sealed: bytes, *, context: str) -> str:
        head = 1 + _KEY_ID_LEN + _NONCE_LEN
        if len(sealed) < head + 16 or sealed[:1] != _VERSION:
            raise SecretKeyError(f"sealed credentials of {context!r} are corrupt "
                                 "(unknown format)")
        kid = sealed[1:1 + _KEY_ID_LEN]
        if kid != self._key_id:
            raise SecretKeyError(
                f"credentials of {context!r} were sealed with another key (key id "
                f"{kid.hex()}, this key is {self._key_id.hex()}): set {KEY_ENV} or "
                f"the key file to the key used at registration")
        try:
            plain = self._aead.decrypt(sealed[1 + _KEY_ID_LEN:head], sealed[head:],
                                       context.encode("utf-8"))
        except InvalidTag:
            raise SecretKeyError(f"sealed credentials of {context!r} fail authentication "
                                 "(tampered with, or moved from another device)") from None
        return plain.decode("utf-8")


def load_key(state_dir: Path, env: dict[str, str] | None = None, *, create: bool = True) -> bytes:
    """The sealing key: ``POLLER_SECRET_KEY``, else the state directory's key file.

    With ``create`` the key file is made (mode 0600, exclusively) if missing.
    """
    env = dict(os.environ) if env is None else env
    if env.get(KEY_ENV):
        return decode_key(env[KEY_ENV], KEY_ENV)
    path = state_dir / KEY_FILE_NAME
    try:
        return _read_key_file(path)
    except FileNotFoundError:
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
