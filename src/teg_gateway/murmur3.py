"""MurmurHash3 (Austin Appleby's public-domain algorithm), x86_32 and x64_128, in pure Python.

ThingsBoard offers MURMUR3_32 and MURMUR3_128 as OTA package checksums. Written here, not
taken from a compiled extension, so the gateway installs from pure-Python wheels on any
architecture. Both hashers work incrementally (``update`` several times, then ``digest``),
like hashlib's, and give the same values as the reference C++ implementation (and as
Guava, which ThingsBoard uses, and the ``mmh3`` package).

Pure Python hashes a few MB/s: fine for an occasional package check run in a worker
thread, not for a hot path.
"""

from __future__ import annotations

import struct

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
# Enough blocks per struct.unpack call to amortise it, small enough to stay in cache.
_UNPACK_BYTES = 64 * 1024


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


class Murmur3x86_32:
    """MurmurHash3_x86_32. ``digest()`` is the 4 bytes of the value, little-endian."""

    block_size = 4
    digest_size = 4
    _C1 = 0xCC9E2D51
    _C2 = 0x1B873593

    def __init__(self, data: bytes = b"", seed: int = 0) -> None:
        self._h = seed & _M32
        self._length = 0
        self._pending = b""
        self.update(data)

    def update(self, data: bytes) -> None:
        self._length += len(data)
        buffer = self._pending + bytes(data) if self._pending else bytes(data)
        whole = len(buffer) - len(buffer) % 4
        c1, c2 = self._C1, self._C2
        h = self._h
        for start in range(0, whole, _UNPACK_BYTES):
            end = min(start + _UNPACK_BYTES, whole)
            for word in struct.unpack_from(f"<{(end - start) // 4}I", buffer, start):
                k = (word * c1) & _M32
                k = ((k << 15) | (k >> 17)) & _M32
                h ^= (k * c2) & _M32
                h = ((h << 13) | (h >> 19)) & _M32
                h = (h * 5 + 0xE6546B64) & _M32
        self._h = h
        self._pending = buffer[whole:]

    def intdigest(self) -> int:
        """The unsigned 32-bit value."""
        h = self._h
        if self._pending:
            k = int.from_bytes(self._pending, "little")
            k = (k * self._C1) & _M32
            k = ((k << 15) | (k >> 17)) & _M32
            h ^= (k * self._C2) & _M32
        return _fmix32(h ^ (self._length & _M32))

    def digest(self) -> bytes:
        return self.intdigest().to_bytes(4, "little")

    def hexdigest(self) -> str:
        return self.digest().hex()


class Murmur3x64_128:
    """MurmurHash3_x64_128. ``digest()`` is h1 then h2, each 8 bytes little-endian (the
    reference's output bytes, Guava's ``HashCode`` bytes); ``intdigest()`` reads those 16
    bytes as one little-endian number (``h2 << 64 | h1``)."""

    block_size = 16
    digest_size = 16
    _C1 = 0x87C37B91114253D5
    _C2 = 0x4CF5AD432745937F

    def __init__(self, data: bytes = b"", seed: int = 0) -> None:
        self._h1 = seed & _M32  # the reference takes a 32-bit seed for both halves
        self._h2 = seed & _M32
        self._length = 0
        self._pending = b""
        self.update(data)

    def update(self, data: bytes) -> None:
        self._length += len(data)
        buffer = self._pending + bytes(data) if self._pending else bytes(data)
        whole = len(buffer) - len(buffer) % 16
        c1, c2 = self._C1, self._C2
        h1, h2 = self._h1, self._h2
        for start in range(0, whole, _UNPACK_BYTES):
            end = min(start + _UNPACK_BYTES, whole)
            words = struct.unpack_from(f"<{(end - start) // 8}Q", buffer, start)
            for w1, w2 in zip(words[::2], words[1::2], strict=True):
                k1 = (w1 * c1) & _M64
                k1 = ((k1 << 31) | (k1 >> 33)) & _M64
                h1 ^= (k1 * c2) & _M64
                h1 = ((h1 << 27) | (h1 >> 37)) & _M64
                h1 = ((h1 + h2) * 5 + 0x52DCE729) & _M64
                k2 = (w2 * c2) & _M64
                k2 = ((k2 << 33) | (k2 >> 31)) & _M64
                h2 ^= (k2 * c1) & _M64
                h2 = ((h2 << 31) | (h2 >> 33)) & _M64
                h2 = ((h2 + h1) * 5 + 0x38495AB5) & _M64
        self._h1, self._h2 = h1, h2
        self._pending = buffer[whole:]

    def _final(self) -> tuple[int, int]:
        h1, h2 = self._h1, self._h2
        tail = self._pending
        if len(tail) > 8:
            k2 = int.from_bytes(tail[8:], "little")
            k2 = (k2 * self._C2) & _M64
            k2 = ((k2 << 33) | (k2 >> 31)) & _M64
            h2 ^= (k2 * self._C1) & _M64
        if tail:
            k1 = int.from_bytes(tail[:8], "little")
            k1 = (k1 * self._C1) & _M64
            k1 = ((k1 << 31) | (k1 >> 33)) & _M64
            h1 ^= (k1 * self._C2) & _M64
        length = self._length & _M64
        h1 ^= length
        h2 ^= length
        h1 = (h1 + h2) & _M64
        h2 = (h2 + h1) & _M64
        h1 = _fmix64(h1)
        h2 = _fmix64(h2)
        h1 = (h1 + h2) & _M64
        h2 = (h2 + h1) & _M64
        return h1, h2

    def intdigest(self) -> int:
        h1, h2 = self._final()
        return (h2 << 64) | h1

    def digest(self) -> bytes:
        h1, h2 = self._final()
        return h1.to_bytes(8, "little") + h2.to_bytes(8, "little")

    def hexdigest(self) -> str:
        return self.digest().hex()


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 of ``data`` as an unsigned number."""
    return Murmur3x86_32(data, seed).intdigest()


def murmur3_x64_128(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x64_128 of ``data`` as an unsigned number (``h2 << 64 | h1``)."""
    return Murmur3x64_128(data, seed).intdigest()
