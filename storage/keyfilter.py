"""``KeyFilter``: a set of uint64 keys that answers "maybe" or "certainly not".

The tiered store keeps one per cold table it saw empty at open, holding every key it
has written there since: a hot miss the filter rules out is a new id, and needs no cold
read (a RocksDB multi-get costs ~0.2 us a key even when it finds nothing).

A Bloom filter that grows by layers (a scalable Bloom filter): keys go into the newest
layer until it holds its design count, then a layer four times larger starts. A lookup
probes every layer, so the false-positive rate is the sum of the layers' (~0.8% each at
10 bits and 7 probes a key); a false positive costs only the cold read it would have
cost anyway. Keys are never removed: a deleted row's key just stays a false positive.
Memory: 10 bits (rounded up to a power of two) a key of each layer's design count,
allocated when the layer starts: 11 MB after 2M distinct keys. ``max_bytes`` caps it:
past that, ``add`` says so and the owner drops the filter.

Not thread-safe: callers serialise access.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from storage.base import Keys, Mask
from storage.compiled import kernel

_PROBES = 7
_BITS_PER_KEY = 10
_FIRST_LAYER_KEYS = 1 << 16
_GROWTH = 4


@kernel
def _mix(key: np.uint64) -> np.uint64:
    """splitmix64's finaliser: patterned keys (small ints in tests) spread too."""
    z = key + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@kernel
def _set_bits(words: npt.NDArray[np.uint64], mask: np.uint64, keys: Keys) -> None:
    for i in range(len(keys)):
        h = _mix(keys[i])
        step = (h >> np.uint64(32)) | np.uint64(1)  # odd: the probes visit distinct bits
        for _ in range(_PROBES):
            bit = h & mask
            words[bit >> np.uint64(6)] |= np.uint64(1) << (bit & np.uint64(63))
            h += step


@kernel
def _test_bits(
    words: npt.NDArray[np.uint64], mask: np.uint64, keys: Keys, maybe: npt.NDArray[np.bool_]
) -> None:
    """Clear ``maybe[i]`` where the layer certainly lacks ``keys[i]``."""
    for i in range(len(keys)):
        if not maybe[i]:
            continue
        h = _mix(keys[i])
        step = (h >> np.uint64(32)) | np.uint64(1)
        for _ in range(_PROBES):
            bit = h & mask
            if not (words[bit >> np.uint64(6)] >> (bit & np.uint64(63))) & np.uint64(1):
                maybe[i] = False
                break
            h += step


def _layer_bits(capacity: int) -> int:
    return 1 << max(6, (capacity * _BITS_PER_KEY - 1).bit_length())  # a power of two


class _Layer:
    def __init__(self, capacity: int) -> None:
        bits = _layer_bits(capacity)
        self.capacity = capacity
        self.count = 0
        self.mask = np.uint64(bits - 1)
        self.words = np.zeros(bits // 64, dtype=np.uint64)


class KeyFilter:
    """Keys added so far, as a Bloom filter that grows (see the module docstring)."""

    def __init__(
        self, first_layer_keys: int = _FIRST_LAYER_KEYS, max_bytes: int | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self._layers = [_Layer(first_layer_keys)]

    def __len__(self) -> int:
        """Keys added (distinct as far as the filter could tell)."""
        return sum(layer.count for layer in self._layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.words.nbytes for layer in self._layers)

    def may_contain(self, keys: Keys) -> Mask:
        """False where a key was certainly never added."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        none: Mask = np.zeros(len(keys), dtype=np.bool_)
        maybe = none
        for layer in self._layers:
            if layer.count == 0:
                continue
            here: Mask = np.ones(len(keys), dtype=np.bool_)
            _test_bits(layer.words, layer.mask, keys, here)
            maybe = here if maybe is none else maybe | here
        return maybe

    def add(self, keys: Keys) -> bool:
        """Add ``keys`` (those the filter may hold already are skipped, so re-adding the
        same keys, as every flush does, does not grow it). False when they need a layer
        that would take the filter past ``max_bytes``: some are then missing, and the
        filter must no longer be used."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        keys = keys[~self.may_contain(keys)]
        while len(keys):
            layer = self._layers[-1]
            room = layer.capacity - layer.count
            if room == 0:
                capacity = layer.capacity * _GROWTH
                if self.max_bytes is not None and (
                    self.nbytes + _layer_bits(capacity) // 8 > self.max_bytes
                ):
                    return False
                self._layers.append(_Layer(capacity))
                continue
            part, keys = keys[:room], keys[room:]
            _set_bits(layer.words, layer.mask, part)
            layer.count += len(part)
        return True


def _load_kernels() -> None:
    """Run each kernel once (see ``storage.compiled``)."""
    keys = np.arange(2, dtype=np.uint64)
    f = KeyFilter(64)
    f.add(keys)
    f.may_contain(keys)


_load_kernels()
