"""Tests of sealed refresh tokens (crypto.py), shaped like pyca/cryptography's test_fernet.py."""

from __future__ import annotations

import base64
import re
from datetime import UTC, date, datetime

import pytest
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF

from crypto import (
    InvalidToken,
    LegacyCipher,
    Opened,
    SpotifyAPIServerCipher,
    TokenSealer,
    UnsealedTokens,
    key_id,
)
from devtools.legacy import legacy_token
from tests.helpers import legacy_vectors, spotifyapiserver_token

SECRET_A = "secret-a-0123456789abcdefghijklmnop"
SECRET_B = "secret-b-0123456789abcdefghijklmnop"
CLIENT_ID = "crypto-test-client-id"
# 37 bytes: the decoded token is 70 bytes, so the last base64 character carries 4 unused bits.
REFRESH = "AQB1x-sample-refresh-token_0123456789"
LEGACY_VECTORS = legacy_vectors()
TOKEN_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Regions of a decoded token: version | key id | nonce | ciphertext | tag.
REGIONS = {
    "version": slice(0, 1),
    "key id": slice(1, 5),
    "nonce": slice(5, 17),
    "ciphertext": slice(17, -16),
    "tag": slice(-16, None),
}

SIGNED_IN_AT = 1_780_000_000
GRANT_ID = "00112233445566778899aabbccddeeff"

# Known answers, computed once and frozen: a change to the format breaks these on purpose.
KNOWN_ANSWERS = [
    {
        "secret": "known-answer-secret-0123456789ab",
        "client_id": "kat-client-id",
        "nonce": "000102030405060708090a0b",
        "signed_in_at": 1_780_000_000,
        "grant_id": "00112233445566778899aabbccddeeff",
        "plaintext": "AQB1x-sample-refresh-token_0123456789",
        "token": (
            "AmoDFYAAAQIDBAUGBwgJCgv7FixfHISmHyALLlhlduJeIQlLHE38mi2zGx70wptl-zSotcSrdmWYIB_3"
            "77rmxiGbZSPl2VIIQJv1V11xYPvD7vomQaWwVHAE7TBXgg"
        ),
    },
    {
        "secret": "known-answer-secret-0123456789ab",
        "client_id": "kat-client-id",
        "nonce": "ffeeddccbbaa998877665544",
        "signed_in_at": None,
        "grant_id": "ffffffffffffffffffffffffffffffff",
        "plaintext": "AQ",
        "token": "AmoDFYD_7t3Mu6qZiHdmVUTTLvjIaPRgjfsZF9ZFJ_MdPPLS6Yp8JXKmMLHfOh5yCHYAjaJhCfalW3c",
    },
]

# Version 1 (no sign-in time, no grant id): no longer sealed, still opened.
KNOWN_ANSWERS_V1 = [
    {
        "secret": "known-answer-secret-0123456789ab",
        "client_id": "kat-client-id",
        "nonce": "000102030405060708090a0b",
        "plaintext": "AQB1x-sample-refresh-token_0123456789",
        "token": (
            "AWoDFYAAAQIDBAUGBwgJCgu6R25uDrFwfk1qYA4MUeFP2_WSz6xV"
            "G7mXJAP1i4Qlrmzu7pm_4t80329mILpc5aH8mSRwfg"
        ),
    },
    {
        "secret": "known-answer-secret-0123456789ab",
        "client_id": "kat-client-id",
        "nonce": "ffeeddccbbaa998877665544",
        "plaintext": "AQ",
        "token": "AWoDFYD_7t3Mu6qZiHdmVUSSf7Wk-77ZRmnbeA_f5Dt4CM4",
    },
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def reference_seal(
    secret: str,
    client_id: str,
    nonce: bytes,
    plaintext: str,
    version: int = 2,
    signed_in_at: int | None = SIGNED_IN_AT,
    grant_id: str = GRANT_ID,
) -> str:
    """The format of docs/token-format.md, built from primitives without crypto.py (version 1 with version=1)."""
    salt = b"spotify-token-swap"
    key = HKDF(secret.encode(), 32, salt, SHA256, context=b"v1 aes-256-gcm key")
    kid = HKDF(secret.encode(), 4, salt, SHA256, context=b"v1 key id")
    header = bytes([version]) + kid
    grant = (signed_in_at or 0).to_bytes(8, "big") + bytes.fromhex(grant_id) if version != 1 else b""
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=16)
    cipher.update(header + client_id.encode())
    ciphertext, tag = cipher.encrypt_and_digest(grant + plaintext.encode())
    return b64url(header + nonce + ciphertext + tag)


@pytest.fixture
def sealer() -> TokenSealer:
    return TokenSealer([SECRET_A], CLIENT_ID)


@pytest.fixture
def token(sealer) -> str:
    return sealer.seal(REFRESH)


# Round trips and shape


@pytest.mark.parametrize(
    "plaintext",
    [REFRESH, "x", "AQ" + "z" * 2000, "ünïcødé ✓ refresh token", "emoji 🎵 and\nnewline"],
)
def test_round_trip(sealer, plaintext):
    assert sealer.open(sealer.seal(plaintext, SIGNED_IN_AT, GRANT_ID)) == Opened(
        plaintext, needs_reseal=False, signed_in_at=SIGNED_IN_AT, grant_id=GRANT_ID
    )


def test_sign_in_time_not_known_stays_not_known(sealer):
    opened = sealer.open(sealer.seal(REFRESH, signed_in_at=None, grant_id=GRANT_ID))
    assert (opened.signed_in_at, opened.grant_id) == (None, GRANT_ID)


def test_each_seal_without_a_grant_id_starts_a_new_grant(sealer):
    grants = {sealer.open(sealer.seal(REFRESH, SIGNED_IN_AT)).grant_id for _ in range(50)}
    assert len(grants) == 50 and all(re.fullmatch(r"[0-9a-f]{32}", grant) for grant in grants)


@pytest.mark.parametrize("signed_in_at", [0, -1, 2**63])
def test_sign_in_time_outside_the_field_is_refused(sealer, signed_in_at):
    with pytest.raises(ValueError):
        sealer.seal(REFRESH, signed_in_at, GRANT_ID)


@pytest.mark.parametrize("grant_id", ["00" * 15, "00" * 17, "not hex at all, 32 characters ok"])
def test_grant_id_of_another_shape_is_refused(sealer, grant_id):
    with pytest.raises(ValueError):
        sealer.seal(REFRESH, SIGNED_IN_AT, grant_id)


def test_token_length_is_header_nonce_plaintext_tag(sealer):
    for plaintext in ("x", REFRESH, "é" * 10):
        data = unb64url(sealer.seal(plaintext))
        assert len(data) == 1 + 4 + 12 + 8 + 16 + len(plaintext.encode()) + 16


def test_tokens_contain_only_url_safe_characters(sealer):
    for length in range(1, 200):
        token = sealer.seal("+/=" * length)
        assert TOKEN_ALPHABET.fullmatch(token), token


def test_a_token_ending_in_any_character_opens(sealer):
    """Only padding is cut from the base64url text: a token may end in any of the 64 characters, and each opens.
    Nonces are chosen (sealer._seal, the known-answer seam) until every last character has been seen."""
    last: dict[str, tuple[str, str]] = {}
    for plaintext in (REFRESH, REFRESH + "x", REFRESH + "xx"):  # one of them fills the last base64 group
        for n in range(2000):
            token = sealer._seal(plaintext, n.to_bytes(12, "big"), SIGNED_IN_AT, "00" * 16)
            last.setdefault(token[-1], (token, plaintext))
    assert len(last) == 64
    for token, plaintext in last.values():
        assert sealer.open(token).refresh_token == plaintext


def test_nonce_differs_per_seal(sealer):
    tokens = [sealer.seal(REFRESH) for _ in range(200)]
    assert len(set(tokens)) == len(tokens)
    assert len({unb64url(t)[REGIONS["nonce"]] for t in tokens}) == len(tokens)


def test_header_carries_version_and_key_id_of_first_secret(token):
    data = unb64url(token)
    assert data[0] == 0x02
    assert data[REGIONS["key id"]] == key_id(SECRET_A)
    assert key_id(SECRET_A) != key_id(SECRET_B)


def test_empty_plaintext_is_refused(sealer):
    with pytest.raises(ValueError):
        sealer.seal("")


def test_construction_errors():
    with pytest.raises(ValueError):
        TokenSealer([], CLIENT_ID)
    with pytest.raises(ValueError):
        TokenSealer([SECRET_A, SECRET_A], CLIENT_ID)


# Known answers, checked two ways


@pytest.mark.parametrize("vector", KNOWN_ANSWERS, ids=lambda v: v["plaintext"][:8])
def test_known_answer(vector):
    sealer = TokenSealer([vector["secret"]], vector["client_id"])
    nonce, signed_in_at, grant_id = bytes.fromhex(vector["nonce"]), vector["signed_in_at"], vector["grant_id"]
    assert sealer._seal(vector["plaintext"], nonce, signed_in_at, grant_id) == vector["token"]
    assert (
        reference_seal(
            vector["secret"], vector["client_id"], nonce, vector["plaintext"], 2, signed_in_at, grant_id
        )
        == vector["token"]
    )
    assert sealer.open(vector["token"]) == Opened(
        vector["plaintext"], needs_reseal=False, signed_in_at=signed_in_at, grant_id=grant_id
    )


@pytest.mark.parametrize("vector", KNOWN_ANSWERS_V1, ids=lambda v: v["plaintext"][:8])
def test_known_answer_of_version_1_opens_to_be_sealed_anew(vector):
    """Sign-in time and grant id not known: never invented."""
    nonce = bytes.fromhex(vector["nonce"])
    assert reference_seal(vector["secret"], vector["client_id"], nonce, vector["plaintext"], 1) == vector["token"]
    opened = TokenSealer([vector["secret"]], vector["client_id"]).open(vector["token"])
    assert opened == Opened(vector["plaintext"], needs_reseal=True, signed_in_at=None, grant_id=None)


def test_an_authentic_version_2_token_too_short_for_its_fields_is_refused(sealer):
    data = bytearray(unb64url(reference_seal(SECRET_A, CLIENT_ID, bytes(12), "")))
    assert len(data) == 1 + 4 + 12 + 24 + 16
    with pytest.raises(InvalidToken):
        sealer.open(b64url(bytes(data)))


def test_reference_matches_random_nonces(sealer):
    for plaintext in ("x", REFRESH, "ünï"):
        token = sealer.seal(plaintext)
        nonce = unb64url(token)[REGIONS["nonce"]]
        opened = sealer.open(token)
        assert reference_seal(SECRET_A, CLIENT_ID, nonce, plaintext, 2, None, opened.grant_id) == token


# Every way a token can be bad raises the one opaque InvalidToken


@pytest.mark.parametrize("region", REGIONS)
def test_flipped_bit_in_every_byte_of_region(sealer, token, region):
    data = unb64url(token)
    positions = range(len(data))[REGIONS[region]]
    assert positions
    with_legacy = TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[LegacyCipher(SECRET_A)])
    for position in positions:
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            for opener in (sealer, with_legacy):
                with pytest.raises(InvalidToken):
                    opener.open(b64url(bytes(damaged)))


def test_truncation_at_every_length(sealer, token):
    data = unb64url(token)
    for length in range(len(token)):
        with pytest.raises(InvalidToken):
            sealer.open(token[:length])
    for length in range(len(data)):
        with pytest.raises(InvalidToken):
            sealer.open(b64url(data[:length]))


@pytest.mark.parametrize("suffix", [b"\x00", b"\x01" * 3, b"\xff" * 16])
def test_extended_bytes(sealer, token, suffix):
    with pytest.raises(InvalidToken):
        sealer.open(b64url(unb64url(token) + suffix))


@pytest.mark.parametrize("suffix", ["A", "AA", "AAA", "AAAA", "_", "-"])
def test_extended_text(sealer, token, suffix):
    with pytest.raises(InvalidToken):
        sealer.open(token + suffix)


@pytest.mark.parametrize("version", [0x00, 0x01, 0x03, 0x80, 0xFF])
def test_wrong_version_byte(sealer, token, version):
    data = bytearray(unb64url(token))
    data[0] = version
    with pytest.raises(InvalidToken):
        sealer.open(b64url(bytes(data)))


@pytest.mark.parametrize("version", [0x00, 0x03, 0xFF])
def test_authentic_token_of_unknown_version(sealer, version):
    """Correctly tagged under the right key, but a version this code does not know."""
    token = reference_seal(SECRET_A, CLIENT_ID, bytes(12), REFRESH, version=version)
    with pytest.raises(InvalidToken):
        sealer.open(token)


def test_another_secret(token):
    with pytest.raises(InvalidToken):
        TokenSealer([SECRET_B], CLIENT_ID).open(token)


def test_another_client_id(token):
    with pytest.raises(InvalidToken):
        TokenSealer([SECRET_A], "another-client-id").open(token)


def test_key_id_of_a_listed_secret_with_foreign_body(sealer):
    """A token under B relabelled with A's key id does not open under A."""
    data = bytearray(unb64url(TokenSealer([SECRET_B], CLIENT_ID).seal(REFRESH)))
    data[REGIONS["key id"]] = key_id(SECRET_A)
    with pytest.raises(InvalidToken):
        sealer.open(b64url(bytes(data)))


def test_spliced_tokens(sealer):
    first, second = unb64url(sealer.seal(REFRESH)), unb64url(sealer.seal(REFRESH[::-1]))
    spliced = first[:17] + second[17:]
    with pytest.raises(InvalidToken):
        sealer.open(b64url(spliced))


def test_non_canonical_base64(sealer, token):
    data = unb64url(token)
    assert len(data) % 3 == 1  # the last character has 4 unused low bits
    last = B64URL.index(token[-1])
    for low_bits in range(1, 16):
        spelled = token[:-1] + B64URL[last ^ low_bits]
        assert unb64url(spelled) == data  # same bytes, other spelling
        with pytest.raises(InvalidToken):
            sealer.open(spelled)


@pytest.mark.parametrize("padding", ["=", "==", "==="])
def test_padding_is_refused(sealer, token, padding):
    with pytest.raises(InvalidToken):
        sealer.open(token + padding)


@pytest.mark.parametrize("char", ["+", "/", " ", "\n", ".", "~", "=", "é", "\x00", "%"])
def test_non_base64url_characters(sealer, token, char):
    for position in (0, len(token) // 2, len(token) - 1):
        with pytest.raises(InvalidToken):
            sealer.open(token[:position] + char + token[position + 1 :])
    with pytest.raises(InvalidToken):
        sealer.open(token + char)


def test_standard_base64_spelling_is_refused(sealer):
    for _ in range(50):
        token = sealer.seal(REFRESH)
        standard = token.replace("-", "+").replace("_", "/")
        if standard != token:
            with pytest.raises(InvalidToken):
                sealer.open(standard)
            return
    pytest.fail("no token with '-' or '_' in 50 tries")


@pytest.mark.parametrize("length", [8193, 100_000, 1_000_000])
def test_very_long_input(sealer, length):
    with pytest.raises(InvalidToken):
        sealer.open("A" * length)


@pytest.mark.parametrize("junk", ["", "(null)", "null", "AQDxyzRawSpotifyRefreshToken", "A", "AA"])
def test_junk(sealer, junk):
    with pytest.raises(InvalidToken):
        sealer.open(junk)


# Key rotation


def test_rotation_old_key_still_listed():
    old_token = TokenSealer([SECRET_A], CLIENT_ID).seal(REFRESH)
    rotated = TokenSealer([SECRET_B, SECRET_A], CLIENT_ID)
    new_token = rotated.seal(REFRESH)
    assert unb64url(new_token)[REGIONS["key id"]] == key_id(SECRET_B)
    assert rotated.open(old_token).needs_reseal
    assert not rotated.open(new_token).needs_reseal


def test_rotation_old_key_removed():
    old_token = TokenSealer([SECRET_A], CLIENT_ID).seal(REFRESH)
    with pytest.raises(InvalidToken):
        TokenSealer([SECRET_B], CLIENT_ID).open(old_token)


# Legacy tokens (encrypted_strings gem defaults)


def damaged_forms(ciphertext: str) -> dict[str, str]:
    """The ways clients in the field mangle a legacy token."""
    return {
        "as given": ciphertext,
        "literal backslash-n": ciphertext.replace("\n", "\\n"),
        "no trailing newline": ciphertext.rstrip("\n"),
        "no newlines": ciphertext.replace("\n", ""),
        "plus as space": ciphertext.replace("+", " "),
        "plus as space, no newlines": ciphertext.replace("\n", "").replace("+", " "),
        "crlf": ciphertext.replace("\n", "\r\n"),
    }


# Plaintexts whose ciphertext under "s3cret" contains '+', so the space damage is really exercised.
PLUS_PLAINTEXTS = ["AQC-legacy-plus-11", "AQC-legacy-plus-15", "AQC-legacy-plus-16"]


def legacy_cases() -> list[tuple[str, str, str]]:
    cases = [(v["secret"], v["plaintext"], v["ciphertext"]) for v in LEGACY_VECTORS]
    cases += [("s3cret", p, legacy_token("s3cret", p)) for p in PLUS_PLAINTEXTS]
    return cases


def test_legacy_encrypt_reproduces_the_gem():
    for vector in LEGACY_VECTORS:
        assert legacy_token(vector["secret"], vector["plaintext"]) == vector["ciphertext"]


def test_plus_cases_really_contain_plus():
    for plaintext in PLUS_PLAINTEXTS:
        ciphertext = legacy_token("s3cret", plaintext)
        assert "+" in ciphertext
        assert damaged_forms(ciphertext)["plus as space"] != ciphertext


@pytest.mark.parametrize("form", list(damaged_forms("")))
@pytest.mark.parametrize("case", legacy_cases(), ids=lambda c: c[1][:20])
def test_legacy_token_opens_in_each_damaged_form(case, form):
    secret, plaintext, ciphertext = case
    sealer = TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[LegacyCipher(secret)])
    assert sealer.open(damaged_forms(ciphertext)[form]) == Opened(plaintext, needs_reseal=True)


@pytest.mark.parametrize("case", legacy_cases(), ids=lambda c: c[1][:20])
def test_legacy_token_with_wrong_secret(case):
    secret, _, ciphertext = case
    sealer = TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[LegacyCipher(secret + "-but-wrong")])
    for damaged in damaged_forms(ciphertext).values():
        with pytest.raises(InvalidToken):
            sealer.open(damaged)


@pytest.mark.parametrize("case", legacy_cases(), ids=lambda c: c[1][:20])
def test_legacy_tokens_refused_when_legacy_is_off(case):
    with pytest.raises(InvalidToken):
        TokenSealer([SECRET_A], CLIENT_ID).open(case[2])


@pytest.mark.parametrize(
    "plaintext", ["", "hello world", "tab\there", "ünïcode", "AQ\x00", "AQ\nAQ", "A" * 2049]
)
def test_legacy_plaintext_not_token_shaped(plaintext):
    ciphertext = legacy_token("s3cret", plaintext)
    sealer = TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[LegacyCipher("s3cret")])
    with pytest.raises(InvalidToken):
        sealer.open(ciphertext)


@pytest.mark.parametrize(
    "junk", ["", "abc", "YWJj\n", "AAAAAAAAAAA=\n", "!!!!", "QUFBQUFBQUFB" * 3, "A" * 100_000]
)
def test_legacy_junk(junk):
    with pytest.raises(InvalidToken):
        TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[LegacyCipher("s3cret")]).open(junk)


def test_legacy_does_not_change_own_tokens(sealer):
    with_legacy = TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[LegacyCipher("s3cret")])
    for plaintext in ("x", REFRESH, "ünï"):
        token = sealer.seal(plaintext, SIGNED_IN_AT, GRANT_ID)
        assert with_legacy.open(token) == sealer.open(token) == Opened(plaintext, False, "", SIGNED_IN_AT, GRANT_ID)
        assert with_legacy.open(with_legacy.seal(plaintext)).refresh_token == plaintext


# SpotifyAPIServer tokens, made by an independent implementation (pyca/cryptography's AESGCM)

SAS_SECRET = "the SECRET_KEY of a SpotifyAPIServer, ünïcode too"


# 131, 132 and 133 characters: the decoded token's length is 0, 1 and 2 modulo 3, so the unpadded text
# needs no padding, "==" and "=" to decode.
SAS_PLAINTEXTS = ["AQ" + "b" * 129, "AQ" + "c" * 130, "AQ" + "d" * 131]


@pytest.fixture
def sas_sealer() -> TokenSealer:
    return TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[SpotifyAPIServerCipher(SAS_SECRET)])


@pytest.mark.parametrize("plaintext", SAS_PLAINTEXTS, ids=lambda p: f"{len(p)} characters")
def test_spotifyapiserver_token_opens_unpadded_and_padded(sas_sealer, plaintext):
    token = spotifyapiserver_token(SAS_SECRET, plaintext)
    padded = token + "=" * (-len(token) % 4)
    expected = Opened(plaintext, needs_reseal=True, key="spotifyapiserver")
    assert sas_sealer.open(token) == sas_sealer.open(padded) == expected
    assert (expected.signed_in_at, expected.grant_id) == (None, None)


def test_spotifyapiserver_padding_lengths_are_all_covered():
    assert sorted(len(spotifyapiserver_token(SAS_SECRET, p)) % 4 for p in SAS_PLAINTEXTS) == [0, 2, 3]


@pytest.mark.parametrize("plaintext", SAS_PLAINTEXTS[1:], ids=lambda p: f"{len(p)} characters")
def test_spotifyapiserver_wrong_padding_is_refused(sas_sealer, plaintext):
    token = spotifyapiserver_token(SAS_SECRET, plaintext)
    right = -len(token) % 4
    for count in {1, 2, 3, 4} - {right}:
        with pytest.raises(InvalidToken):
            sas_sealer.open(token + "=" * count)


def test_spotifyapiserver_token_under_another_secret_or_altered_is_refused(sas_sealer):
    with pytest.raises(InvalidToken):
        sas_sealer.open(spotifyapiserver_token(SAS_SECRET + "x", SAS_PLAINTEXTS[0]))
    data = bytearray(unb64url(spotifyapiserver_token(SAS_SECRET, SAS_PLAINTEXTS[0])))
    for position in (0, 12, len(data) - 1):  # nonce, ciphertext, tag
        damaged = bytearray(data)
        damaged[position] ^= 1
        with pytest.raises(InvalidToken):
            sas_sealer.open(b64url(bytes(damaged)))


@pytest.mark.parametrize("plaintext", ["", "not a token: spaces", "ünï"])
def test_spotifyapiserver_plaintext_not_token_shaped_is_refused(sas_sealer, plaintext):
    with pytest.raises(InvalidToken):
        sas_sealer.open(spotifyapiserver_token(SAS_SECRET, plaintext))


def test_spotifyapiserver_tokens_refused_without_its_secret(sealer):
    with pytest.raises(InvalidToken):
        sealer.open(spotifyapiserver_token(SAS_SECRET, SAS_PLAINTEXTS[0]))


def test_spotifyapiserver_secret_must_not_be_empty():
    with pytest.raises(ValueError):
        SpotifyAPIServerCipher("")


# Raw Spotify tokens, while UNSEALED_TOKENS_UNTIL has not passed


def test_raw_token_opens_through_the_last_day_and_not_after():
    end_of_day = datetime(2027, 3, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    now = [end_of_day]
    sealer = TokenSealer([SECRET_A], CLIENT_ID, fallbacks=[UnsealedTokens(date(2027, 3, 31), lambda: now[0])])
    assert sealer.open(REFRESH) == Opened(REFRESH, needs_reseal=True, key="unsealed")
    now[0] += 1
    with pytest.raises(InvalidToken):
        sealer.open(REFRESH)


@pytest.mark.parametrize("junk", ["", "has space", "x" * 2049, "ünï"])
def test_raw_token_must_look_like_a_spotify_token(junk):
    raw = UnsealedTokens(date(2999, 1, 1))
    with pytest.raises(InvalidToken):
        raw.open(junk)


def test_fallbacks_are_tried_in_order_after_own_tokens(sealer):
    both = TokenSealer(
        [SECRET_A], CLIENT_ID, fallbacks=[SpotifyAPIServerCipher(SAS_SECRET), UnsealedTokens(date(2999, 1, 1))]
    )
    own = sealer.seal(REFRESH, SIGNED_IN_AT, GRANT_ID)
    assert both.open(own).key == key_id(SECRET_A).hex()
    assert both.open(spotifyapiserver_token(SAS_SECRET, REFRESH)).key == "spotifyapiserver"
    assert both.open(REFRESH).key == "unsealed"
