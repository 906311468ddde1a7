"""The pure-Python MurmurHash3: fixed known vectors, and the mmh3 package as an independent
implementation (a development dependency only)."""

from __future__ import annotations

import random

import pytest

from teg_gateway.murmur3 import Murmur3x64_128, Murmur3x86_32, murmur3_32, murmur3_x64_128

FOX = b"The quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize(("data", "seed", "expected"), [
    (b"", 0, 0),
    (b"", 1, 0x514E28B7),
    (b"", 0xFFFFFFFF, 0x81F16F39),
    (b"hello", 0, 0x248BFA47),
    (FOX, 0, 0x2E4FF723),
    (b"\xff\xff\xff\xff", 0, 0x76293B50),
    (b"\x21\x43\x65\x87", 0, 0xF55B516B),
    (b"\x21\x43\x65", 0, 0x7E4A8634),
    (b"\x21\x43", 0, 0xA0F7B07A),
    (b"\x21", 0, 0x72661CF4),
])
def test_x86_32_known_vectors(data: bytes, seed: int, expected: int) -> None:
    assert murmur3_32(data, seed) == expected


def test_x64_128_known_vectors() -> None:
    # Guava's Murmur3_128HashFunction test vector (the bytes ThingsBoard prints).
    assert Murmur3x64_128(FOX).hexdigest() == "6c1b07bc7bbc4be347939ac4a93c437a"
    assert Murmur3x64_128(b"").hexdigest() == "00" * 16
    value = murmur3_x64_128(FOX)
    assert value.to_bytes(16, "little").hex() == "6c1b07bc7bbc4be347939ac4a93c437a"


def test_digest_forms() -> None:
    assert Murmur3x86_32(b"hello").digest() == bytes.fromhex("47fa8b24")
    assert Murmur3x86_32(b"hello").hexdigest() == "47fa8b24"


@pytest.mark.parametrize("cls", [Murmur3x86_32, Murmur3x64_128])
def test_incremental_updates_give_the_one_shot_value(cls: type[Murmur3x86_32]) -> None:
    rng = random.Random(7)
    data = rng.randbytes(200_003)
    whole = cls(data).digest()
    for _ in range(20):
        hasher = cls()
        position = 0
        while position < len(data):
            step = rng.choice([0, 1, 3, 5, 15, 17, 4096, 70_000])
            hasher.update(data[position:position + step])
            position += step
        assert hasher.digest() == whole


def test_same_values_as_mmh3() -> None:
    mmh3 = pytest.importorskip("mmh3", reason="mmh3 (a development dependency) is not "
                                              "installed")
    rng = random.Random(11)
    for length in [*range(70), 1000, 65_536, 131_079]:
        data = rng.randbytes(length)
        for seed in (0, 1, 0x9747B28C, 0xFFFFFFFF):
            assert murmur3_32(data, seed) == mmh3.hash(data, seed, signed=False)
            assert murmur3_x64_128(data, seed) == mmh3.hash128(data, seed, signed=False)
            assert Murmur3x64_128(data, seed).digest() == mmh3.hash_bytes(data, seed)
