"""Refusing a token costs the same work whether its key id is listed or not (docs/security.md)."""

from __future__ import annotations

from typing import Any

import pytest
from Crypto.Cipher import AES

import crypto
from crypto import InvalidToken, LegacyCipher, TokenSealer, _b64url_decode, _b64url_encode, key_id

CLIENT = "client-id"
LISTED = ["a-listed-secret-0123456789", "an-older-secret-0123456789"]


class CountingAES:
    """Stands in for crypto's AES name: the same ciphers, noting each tag check and what it covered."""

    MODE_GCM = AES.MODE_GCM

    def __init__(self) -> None:
        self.checks: list[tuple[int, int]] = []  # (key bytes, ciphertext bytes)

    def new(self, key: bytes, *args: Any, **kwargs: Any) -> Any:
        cipher = AES.new(key, *args, **kwargs)
        checks = self.checks

        class Noted:
            def update(self, data: bytes) -> None:
                cipher.update(data)

            def encrypt_and_digest(self, plaintext: bytes) -> tuple[bytes, bytes]:
                sealed: tuple[bytes, bytes] = cipher.encrypt_and_digest(plaintext)
                return sealed

            def decrypt_and_verify(self, ciphertext: bytes, tag: bytes) -> bytes:
                checks.append((len(key), len(ciphertext)))
                plaintext: bytes = cipher.decrypt_and_verify(ciphertext, tag)
                return plaintext

        return Noted()


def altered(token: str, *, kid: bytes | None = None, flip_tag: bool = False) -> str:
    data = bytearray(_b64url_decode(token))
    if kid is not None:
        data[1:5] = kid
    if flip_tag:
        data[-1] ^= 1
    return _b64url_encode(bytes(data))


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingAES:
    aes = CountingAES()
    monkeypatch.setattr(crypto, "AES", aes)  # this module's name for the cipher, not the library's
    return aes


def test_an_unlisted_key_id_goes_through_the_same_tag_check_as_a_listed_one(counting: CountingAES) -> None:
    sealer = TokenSealer(LISTED, CLIENT)
    token = TokenSealer(LISTED, CLIENT).seal("AQ-" + "x" * 130)
    counting.checks.clear()
    with pytest.raises(InvalidToken):
        sealer.open(altered(token, flip_tag=True))  # a listed key id, a bad tag
    with pytest.raises(InvalidToken):
        sealer.open(altered(token, kid=key_id("a-secret-nobody-listed-0123")))
    [listed, unlisted] = counting.checks
    assert listed == unlisted == (32, len(_b64url_decode(token)) - crypto.MIN_TOKEN_SIZE)


def test_with_a_legacy_secret_both_refusals_try_the_legacy_opener_too(counting: CountingAES) -> None:
    sealer = TokenSealer(LISTED, CLIENT, fallbacks=[LegacyCipher("legacy")])
    token = sealer.seal("AQ-token")
    for bad in (altered(token, flip_tag=True), altered(token, kid=key_id("a-secret-nobody-listed-0123"))):
        with pytest.raises(InvalidToken):
            sealer.open(bad)
    assert len(counting.checks) == 2  # one tag check per refusal, listed or not (the seal checks none)


def test_a_token_whose_tag_checks_under_the_decoy_key_is_still_refused() -> None:
    """The decoy key is random per process; were a token to match it, the key id is still not listed."""
    sealer = TokenSealer(LISTED, CLIENT)
    elsewhere = TokenSealer(["another-deployment-secret-01"], CLIENT)
    sealer._decoy = crypto._derive("another-deployment-secret-01", b"v1 aes-256-gcm key", 32)
    with pytest.raises(InvalidToken):
        sealer.open(elsewhere.seal("AQ-token"))


def test_listed_keys_still_open() -> None:
    sealer = TokenSealer(LISTED, CLIENT)
    older = TokenSealer(LISTED[1:], CLIENT)
    assert sealer.open(sealer.seal("AQ-new")).refresh_token == "AQ-new"
    opened = sealer.open(older.seal("AQ-old"))
    assert opened.refresh_token == "AQ-old" and opened.needs_reseal
