"""Feature keys: a 64-bit hash of (table, raw value), with no vocabulary.

Contract of ``feature_keys``:

* Deterministic across processes and machines (no ``hash()``, no per-process seed).
* An int and its canonical decimal string map to the same key (``42`` and ``"42"``,
  ``-7`` and ``"-7"``), because serving receives JSON values in varying types.
  Canonical means ``0|-?[1-9][0-9]*`` in ASCII, with the value in the int64 range;
  ``"042"``, ``"+42"``, ``" 42"`` and ``"-0"`` are ordinary strings. Ints outside the
  int64 range are hashed as their decimal string, so that rule holds for them too.
  ``bool`` counts as int (``True`` is ``1``).
* The same value in two tables gives unrelated keys (a per-table salt).
* Int64 values go through a vectorised splitmix64 finaliser of ``value ^ salt``, a
  bijection for a fixed table, so distinct ints of one table never collide; other
  strings go through keyed blake2b (8-byte digest).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from hashlib import blake2b

import numpy as np
import numpy.typing as npt

from storage.base import Keys

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")


def splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 output for state ``x`` (adds the golden gamma, then mixes); vectorised.

    ``splitmix64(seed + i * gamma)`` for i = 0, 1, ... is the SplitMix64 stream of ``seed``.
    """
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=1024)
def table_salt(table: str) -> bytes:
    """8 bytes derived from the table name; salts both hash paths."""
    return blake2b(b"streamrec.table:" + table.encode(), digest_size=8).digest()


def _int_keys(values: npt.NDArray[np.int64], salt: bytes) -> Keys:
    salt_u = np.frombuffer(salt, dtype="<u8")[0]
    # int64 -> uint64 reinterpretation is two's complement, so negatives stay distinct.
    return splitmix64(values.view(np.uint64) ^ salt_u)


def _str_key(value: str, salt: bytes) -> bytes:
    return blake2b(value.encode(), digest_size=8, key=salt).digest()


def feature_keys(table: str, values: Sequence[str | int] | npt.NDArray[np.generic]) -> Keys:
    """The uint64 key of each value of ``table``, in order (see the module contract)."""
    salt = table_salt(table)
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "i" or (
            values.dtype.kind == "u" and (values.size == 0 or int(values.max()) <= _INT64_MAX)
        ):
            return _int_keys(np.ascontiguousarray(values, dtype=np.int64).ravel(), salt)
        values = values.ravel().tolist()
    n = len(values)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    if set(map(type, values)) == {int}:  # C-speed type scan: bool and np ints excluded
        try:
            return _int_keys(np.array(values, dtype=np.int64), salt)
        except OverflowError:
            pass  # some ints beyond int64: the mixed path below hashes them as strings
    return _mixed_keys(values, salt)


def int_feature_keys(tables: Sequence[str], values: npt.NDArray[np.int64]) -> Keys:
    """``feature_keys(tables[i], values[i])`` for each row of an int64 matrix, in one
    vectorised pass (a predict batch: one id per field and example)."""
    salts = np.frombuffer(b"".join(map(table_salt, tables)), dtype="<u8").astype(np.uint64)
    values = np.ascontiguousarray(values, dtype=np.int64)
    return splitmix64(values.view(np.uint64) ^ salts[:, None])


def _mixed_keys(values: Sequence[object], salt: bytes) -> Keys:
    out = np.empty(len(values), dtype=np.uint64)
    int_pos: list[int] = []
    int_vals: list[int] = []
    str_pos: list[int] = []
    digests: list[bytes] = []
    for i, v in enumerate(values):
        if isinstance(v, int | np.integer):
            iv = int(v)
            if _INT64_MIN <= iv <= _INT64_MAX:
                int_pos.append(i)
                int_vals.append(iv)
            else:
                str_pos.append(i)
                digests.append(_str_key(str(iv), salt))
        elif isinstance(v, str):
            if _CANONICAL_INT.fullmatch(v) is not None:
                iv = int(v)
                if _INT64_MIN <= iv <= _INT64_MAX:
                    int_pos.append(i)
                    int_vals.append(iv)
                    continue
            str_pos.append(i)
            digests.append(_str_key(v, salt))
        else:
            raise TypeError(
                f"feature value {v!r} of type {type(v).__name__} is neither str nor int"
            )
    if int_pos:
        out[int_pos] = _int_keys(np.array(int_vals, dtype=np.int64), salt)
    if str_pos:
        out[str_pos] = np.frombuffer(b"".join(digests), dtype="<u8")
    return out
