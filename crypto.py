"""Seal and open refresh tokens: AES-256-GCM for our own; openers for the tokens of the servers apps move from.

The sealed token's byte layout, key derivation and associated data are specified in docs/token-format.md, the one
copy of the format; the constants below follow it (tests/test_descriptors.py checks them against that page).
The other openers (the legacy Ruby services' 3DES tokens, SpotifyAPIServer's AES-GCM tokens, raw Spotify tokens
for a while) are composed with the sealer where the service is built, as its `fallbacks`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets as _random
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from Crypto.Cipher import AES, DES3
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.Random import get_random_bytes

# The version sealed; tokens of VERSION_1 (no sign-in time, no grant id) still open.
VERSION = 0x02
VERSION_1 = 0x01
KEY_ID_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + KEY_ID_SIZE
MIN_TOKEN_SIZE = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
# Version 2's plaintext: sign-in time (seconds since the epoch, UTC; 0 = not known) | grant id | refresh token.
SIGNED_IN_SIZE = 8
GRANT_ID_SIZE = 16
GRANT_SIZE = SIGNED_IN_SIZE + GRANT_ID_SIZE
MAX_TOKEN_CHARS = 8192
# A legacy token holds at most 2048 plaintext characters: ~2800 Base64 characters with line breaks.
MAX_LEGACY_CHARS = 4096
# Opened.key of a token the legacy service sealed, SpotifyAPIServer sealed, or that came raw.
LEGACY_KEY = "legacy"
SPOTIFYAPISERVER_KEY = "spotifyapiserver"
UNSEALED_KEY = "unsealed"

_SALT = b"spotify-token-swap"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# What a Spotify refresh token may contain; anything else out of a legacy token is garbage.
_SPOTIFY_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,2048}")


class InvalidToken(Exception):
    """The token was not sealed by this deployment, or was altered. Deliberately says no more."""


@dataclass(frozen=True)
class Opened:
    """A Spotify refresh token taken out of a sealed token, with what the token says of its sign-in."""

    refresh_token: str
    # Sealed under an older key, in an older version or by another server: hand the client a fresh seal.
    needs_reseal: bool = False
    # Which key opened it: the key id in hex (as `flask --app app check` lists it), "legacy",
    # "spotifyapiserver" or "unsealed". Not part of equality: two Opened with the same contents are the
    # same result.
    key: str = field(default=LEGACY_KEY, compare=False)
    # When the user signed in (the swap), whole seconds since the epoch, UTC; None where the token
    # does not say (version 1, other servers' tokens, raw tokens, migrated ones): never guessed.
    signed_in_at: int | None = None
    # The sign-in's random id (32 hex digits), the same in every token of that sign-in; None for a
    # token that carries none (version 1, other servers' tokens, raw tokens).
    grant_id: str | None = None


class Opener(Protocol):
    """Anything that opens a token or raises InvalidToken: the sealer's fallbacks."""

    def open(self, token: str) -> Opened:
        """The refresh token inside `token`; raise InvalidToken."""
        ...


def new_grant_id() -> str:
    """A fresh random grant id: 16 bytes, as 32 hex digits."""
    return _random.token_hex(GRANT_ID_SIZE)


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

    def open(self, token: str) -> Opened:
        """A legacy token's refresh token, to be sealed anew (its sign-in time is not known)."""
        return Opened(self.decrypt(token), needs_reseal=True, key=LEGACY_KEY)


class SpotifyAPIServerCipher:
    """Opens the tokens of Peter Schorn's SpotifyAPIServer (Swift/Vapor), whose `SECRET_KEY` is given.

    AES-256-GCM under SHA-256 of the secret (UTF-8); the token is base64url of nonce (12 bytes) ||
    ciphertext || tag (16 bytes), no associated data. Its tokens are unpadded; a padded spelling
    (as some Base64 decoders and clients rewrite it) opens too, while a wrong padding does not.
    """

    def __init__(self, secret_key: str):
        if not secret_key:
            raise ValueError("SpotifyAPIServer's SECRET_KEY is empty")
        self._key = hashlib.sha256(secret_key.encode("utf-8")).digest()

    def open(self, token: str) -> Opened:
        """The refresh token inside a SpotifyAPIServer token, to be sealed anew in this service's format."""
        unpadded = token.rstrip("=")
        if unpadded != token and (len(token) % 4 or len(token) - len(unpadded) != -len(unpadded) % 4):
            raise InvalidToken
        data = _b64url_decode(unpadded)
        if len(data) <= NONCE_SIZE + TAG_SIZE:
            raise InvalidToken
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=data[:NONCE_SIZE], mac_len=TAG_SIZE)
        try:
            plaintext = cipher.decrypt_and_verify(data[NONCE_SIZE:-TAG_SIZE], data[-TAG_SIZE:]).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise InvalidToken from None
        if not _SPOTIFY_TOKEN.fullmatch(plaintext):
            raise InvalidToken
        return Opened(plaintext, needs_reseal=True, key=SPOTIFYAPISERVER_KEY)


class UnsealedTokens:
    """Takes a raw Spotify refresh token as it is, until the end of a day (UTC): apps that held raw
    tokens (the Glitch Node example, SpotifyAPI-NET's example server) move without logging users out."""

    def __init__(self, until: date, clock: Callable[[], float] = time.time):
        # Through the whole of `until`: refused from 00:00 UTC of the day after.
        self.ends_at = datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC).timestamp()
        self._clock = clock

    def open(self, token: str) -> Opened:
        """The token itself, to be sealed, while the date has not passed and it looks like a Spotify token."""
        if self._clock() >= self.ends_at or not _SPOTIFY_TOKEN.fullmatch(token):
            raise InvalidToken
        return Opened(token, needs_reseal=True, key=UNSEALED_KEY)


def _evp_bytes_to_key(password: bytes, length: int, iterations: int = 2048) -> bytes:
    material, block = b"", b""
    while len(material) < length:
        block = block + password
        for _ in range(iterations):
            block = hashlib.md5(block).digest()
        material += block
    return material[:length]


class TokenSealer:
    """Seals Spotify refresh tokens under the first secret; opens tokens under any listed secret, then
    tries each of `fallbacks` (openers of other formats) in order."""

    def __init__(
        self,
        secrets: Sequence[str],
        client_id: str,
        fallbacks: Sequence[Opener] = (),
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
        self._fallbacks = tuple(fallbacks)

    def seal(self, refresh_token: str, signed_in_at: int | None = None, grant_id: str | None = None) -> str:
        """Seal a Spotify refresh token under the newest key, with its sign-in's time (None: not known) and
        grant id (None: a new grant)."""
        return self._seal(
            refresh_token, get_random_bytes(NONCE_SIZE), signed_in_at, grant_id or new_grant_id()
        )

    def _seal(self, refresh_token: str, nonce: bytes, signed_in_at: int | None, grant_id: str) -> str:
        # Tests call this with a fixed nonce to freeze the format in known-answer vectors.
        if not refresh_token:
            raise ValueError("nothing to seal")
        if signed_in_at is not None and not 0 < signed_in_at < 2**63:
            raise ValueError("the sign-in time is seconds since the epoch, after it")
        grant = bytes.fromhex(grant_id)
        if len(grant) != GRANT_ID_SIZE:
            raise ValueError(f"a grant id is {GRANT_ID_SIZE} bytes")
        header = bytes([VERSION]) + self._kid
        plaintext = struct.pack(">Q", signed_in_at or 0) + grant + refresh_token.encode("utf-8")
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
        cipher.update(header + self._client_id)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return _b64url_encode(header + nonce + ciphertext + tag)

    def open(self, token: str) -> Opened:
        """Open a sealed token, or one a fallback opens; raise InvalidToken."""
        try:
            return self._open(token)
        except InvalidToken:
            if not self._fallbacks:
                raise
        for fallback in self._fallbacks:
            try:
                return fallback.open(token)
            except InvalidToken:
                pass
        raise InvalidToken

    def _open(self, token: str) -> Opened:
        data = _b64url_decode(token)
        version = data[0] if data else None
        if len(data) < MIN_TOKEN_SIZE or version not in (VERSION, VERSION_1):
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
            if version == VERSION_1:
                return Opened(plaintext.decode("utf-8"), needs_reseal=True, key=kid.hex())
            if len(plaintext) <= GRANT_SIZE:  # authentic, yet not what this code seals
                raise InvalidToken
            (signed_in_at,) = struct.unpack(">Q", plaintext[:SIGNED_IN_SIZE])
            return Opened(
                plaintext[GRANT_SIZE:].decode("utf-8"),
                needs_reseal=old,
                key=kid.hex(),
                signed_in_at=signed_in_at or None,
                grant_id=plaintext[SIGNED_IN_SIZE:GRANT_SIZE].hex(),
            )
        except (ValueError, UnicodeDecodeError):
            raise InvalidToken from None
