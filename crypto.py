"""Seal and open refresh tokens: AES-256-GCM for our own, 3DES-CBC to read the legacy Ruby services' tokens.

The sealed token's byte layout, key derivation and associated data are specified in docs/token-format.md, the one
copy of the format; the constants below follow it (tests/test_descriptors.py checks them against that page).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from Crypto.Cipher import AES, DES3
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.Random import get_random_bytes

VERSION = 0x01
KEY_ID_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + KEY_ID_SIZE
MIN_TOKEN_SIZE = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
MAX_TOKEN_CHARS = 8192
# A legacy token holds at most 2048 plaintext characters: ~2800 Base64 characters with line breaks.
MAX_LEGACY_CHARS = 4096
# Opened.key of a token the legacy service sealed.
LEGACY_KEY = "legacy"

_SALT = b"spotify-token-swap"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# What a Spotify refresh token may contain; anything else out of a legacy token is garbage.
_SPOTIFY_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,2048}")


class InvalidToken(Exception):
    """The token was not sealed by this deployment, or was altered. Deliberately says no more."""


@dataclass(frozen=True)
class Opened:
    """A Spotify refresh token taken out of a sealed token."""

    refresh_token: str
    # Sealed under an older key or by a legacy service: hand the client a fresh seal.
    needs_reseal: bool = False
    # Which key opened it: the key id in hex (as `flask --app app check` lists it), or "legacy".
    # Not part of equality: two Opened with the same token and reseal need are the same result.
    key: str = field(default=LEGACY_KEY, compare=False)


def _derive(secret: str, info: bytes, length: int) -> bytes:
    return HKDF(secret.encode("utf-8"), length, _SALT, SHA256, context=info)


def key_id(secret: str) -> bytes:
    """The 4-byte identifier of a secret, as written in the tokens it seals."""
    return _derive(secret, b"v1 key id", KEY_ID_SIZE)


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(token: str) -> bytes:
    if len(token) > MAX_TOKEN_CHARS or not _BASE64URL.fullmatch(token):
        raise InvalidToken
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken from None
    # Only the canonical spelling opens: no unused low bits in the last character.
    if _b64url_encode(data) != token:
        raise InvalidToken
    return data


class LegacyCipher:
    """Opens tokens made by the `encrypted_strings` gem's defaults (Spotify's Ruby demo, the Sinatra service).

    DES-EDE3-CBC; key and IV from OpenSSL's EVP_BytesToKey (MD5, no salt, 2048 iterations) over the
    secret; PKCS#7 padding; standard Base64 with a newline every 60 characters. No integrity: a
    token is accepted only if it decrypts to something shaped like a Spotify refresh token.
    """

    def __init__(self, secret: str):
        material = _evp_bytes_to_key(secret.encode("utf-8"), 24 + 8)
        self._key, self._iv = material[:24], material[24:]
        DES3.new(self._key, DES3.MODE_CBC, iv=self._iv)  # fail at start, not per request

    def decrypt(self, token: str) -> str:
        """The plaintext of a legacy token, tolerating the damage seen in the field."""
        if len(token) > MAX_LEGACY_CHARS:
            raise InvalidToken
        cleaned = (
            token.replace("\\n", "").replace("\r", "").replace("\n", "").replace(" ", "+")
        )
        try:
            data = base64.b64decode(cleaned, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidToken from None
        if not data or len(data) % 8:
            raise InvalidToken
        padded = DES3.new(self._key, DES3.MODE_CBC, iv=self._iv).decrypt(data)
        pad = padded[-1]
        if not 1 <= pad <= 8 or padded[-pad:] != bytes([pad]) * pad:
            raise InvalidToken
        try:
            plaintext = padded[:-pad].decode("ascii")
        except UnicodeDecodeError:
            raise InvalidToken from None
        if not _SPOTIFY_TOKEN.fullmatch(plaintext):
            raise InvalidToken
        return plaintext


def _evp_bytes_to_key(password: bytes, length: int, iterations: int = 2048) -> bytes:
    material, block = b"", b""
    while len(material) < length:
        block = block + password
        for _ in range(iterations):
            block = hashlib.md5(block).digest()
        material += block
    return material[:length]


class TokenSealer:
    """Seals Spotify refresh tokens under the first secret; opens tokens under any listed secret."""

    def __init__(
        self,
        secrets: Sequence[str],
        client_id: str,
        legacy_secret: str | None = None,
    ):
        if not secrets:
            raise ValueError("at least one secret is needed")
        self._client_id = client_id.encode("utf-8")
        self._keys: dict[bytes, tuple[bytes, bool]] = {}
        for position, secret in enumerate(secrets):
            kid = key_id(secret)
            if kid in self._keys:
                raise ValueError("two secrets share a key id; use distinct secrets")
            self._keys[kid] = (_derive(secret, b"v1 aes-256-gcm key", 32), position > 0)
        # Opens a token whose key id is not listed, so that refusing it costs what refusing a
        # listed one with a bad tag costs: the answer's time does not tell which key ids are listed.
        self._decoy = get_random_bytes(32)
        self._kid = key_id(secrets[0])
        self._key = self._keys[self._kid][0]
        self._header = bytes([VERSION]) + self._kid
        self._legacy = LegacyCipher(legacy_secret) if legacy_secret else None

    def seal(self, refresh_token: str) -> str:
        """Seal a Spotify refresh token under the newest key."""
        return self._seal(refresh_token, get_random_bytes(NONCE_SIZE))

    def _seal(self, refresh_token: str, nonce: bytes) -> str:
        # Tests call this with a fixed nonce to freeze the format in known-answer vectors.
        if not refresh_token:
            raise ValueError("nothing to seal")
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
        cipher.update(self._header + self._client_id)
        ciphertext, tag = cipher.encrypt_and_digest(refresh_token.encode("utf-8"))
        return _b64url_encode(self._header + nonce + ciphertext + tag)

    def open(self, token: str) -> Opened:
        """Open a sealed token (or a legacy one, when a legacy secret is set); raise InvalidToken."""
        try:
            return self._open(token)
        except InvalidToken:
            if self._legacy is None:
                raise
        return Opened(self._legacy.decrypt(token), needs_reseal=True, key=LEGACY_KEY)

    def _open(self, token: str) -> Opened:
        data = _b64url_decode(token)
        if len(data) < MIN_TOKEN_SIZE or data[0] != VERSION:
            raise InvalidToken
        header, kid = data[:HEADER_SIZE], data[1:HEADER_SIZE]
        listed = self._keys.get(kid)
        key, old = listed if listed is not None else (self._decoy, False)
        nonce = data[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
        cipher.update(header + self._client_id)
        try:
            plaintext = cipher.decrypt_and_verify(
                data[HEADER_SIZE + NONCE_SIZE : -TAG_SIZE], data[-TAG_SIZE:]
            )
            if listed is None:  # the decoy key is nobody's: its tag checks fail (but for 2^-128)
                raise InvalidToken
            return Opened(plaintext.decode("utf-8"), needs_reseal=old, key=kid.hex())
        except (ValueError, UnicodeDecodeError):
            raise InvalidToken from None
