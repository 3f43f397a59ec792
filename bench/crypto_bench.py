"""Crypto micro-benchmark: microseconds to seal and to open one refresh token (crypto.TokenSealer).

    python bench/crypto_bench.py [--number 2000] [--repeat 7]

Each figure is the median over --repeat runs of timeit's mean over --number calls, so a burst
of noise from other processes moves it less than a single run would.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto import LegacyCipher, TokenSealer  # noqa: E402
from devtools.legacy import legacy_token  # noqa: E402

SECRET = "bench-secret-0123456789abcdef-not-for-production"
OLD_SECRET = "bench-old-secret-0123456789abcdef"
LEGACY_SECRET = "bench-legacy-secret"
CLIENT_ID = "bench-client-id"
# A real Spotify refresh token is about 130 URL-safe characters.
REFRESH_TOKEN = "AQ" + "x" * 128


def per_call_us(call, number: int, repeat: int) -> float:
    """Median over `repeat` runs of the mean microseconds per call."""
    runs = timeit.repeat(call, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=7, help="runs; the median is reported (default 7)")
    args = parser.parse_args()

    sealer = TokenSealer([SECRET], CLIENT_ID)
    rotated = TokenSealer([SECRET, OLD_SECRET], CLIENT_ID)
    legacy = TokenSealer([SECRET], CLIENT_ID, fallbacks=[LegacyCipher(LEGACY_SECRET)])
    token = sealer.seal(REFRESH_TOKEN)
    old_token = TokenSealer([OLD_SECRET], CLIENT_ID).seal(REFRESH_TOKEN)
    legacy_sealed = legacy_token(LEGACY_SECRET, REFRESH_TOKEN)
    assert sealer.open(token).refresh_token == REFRESH_TOKEN

    cases = [
        ("seal", lambda: sealer.seal(REFRESH_TOKEN)),
        ("open", lambda: sealer.open(token)),
        ("open, older key (rotation)", lambda: rotated.open(old_token)),
        ("open, legacy 3DES token", lambda: legacy.open(legacy_sealed)),
        ("open, tampered (rejected)", lambda: _rejects(sealer, token[:-2] + "AA")),
    ]
    print(f"{len(REFRESH_TOKEN)}-character refresh token; median of {args.repeat} runs x {args.number} calls")
    for name, call in cases:
        print(f"  {name:<28} {per_call_us(call, args.number, args.repeat):7.1f} us")
    return 0


def _rejects(sealer: TokenSealer, token: str) -> None:
    try:
        sealer.open(token)
    except Exception:  # InvalidToken, the only thing open() raises
        return
    raise AssertionError("a tampered token opened")


if __name__ == "__main__":
    sys.exit(main())
