"""Legacy tokens made as the Ruby services made them, for tests and benchmarks beyond the shared vectors.

The service only ever opens such tokens (crypto.LegacyCipher); sealing them is a development tool. Written
apart from crypto.py on purpose: tests/test_crypto.py checks it against the vectors made by the
`encrypted_strings` gem itself, so it is an independent reference, not a copy of the code under test.
"""

from __future__ import annotations

import base64
import hashlib

from Crypto.Cipher import DES3


def legacy_token(secret: str, plaintext: str) -> str:
    """What `encrypted_strings`' defaults make of plaintext: DES-EDE3-CBC, OpenSSL's key derivation
    (MD5, no salt, 2048 iterations), PKCS#7 padding, Base64 with a newline every 60 characters."""
    material, block = b"", b""
    while len(material) < 32:
        block += secret.encode("utf-8")
        for _ in range(2048):
            block = hashlib.md5(block).digest()
        material += block
    key, iv = material[:24], material[24:32]
    data = plaintext.encode("utf-8")
    pad = 8 - len(data) % 8
    sealed = DES3.new(key, DES3.MODE_CBC, iv=iv).encrypt(data + bytes([pad]) * pad)
    text = base64.b64encode(sealed).decode("ascii")
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))
