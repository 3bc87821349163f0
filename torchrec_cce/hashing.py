"""The one seeded hash family used by every method.

A hash is a pure function of ``(seed, table, chunk, role, id)``: the same on every rank,
process, restart and device. Nothing random is stored as a table.

* :func:`derive_seed` turns ``(seed, table name, chunk, role)`` into a 63-bit key, in Python
  with a fixed digest (not Python's salted ``hash``), so it is stable across processes.
* :func:`hash_ids` maps int64 ids of any value (negative, or Criteo's arbitrary 64-bit hashes)
  to ``[0, rows)`` with the splitmix64 finaliser, written in vectorised int64 torch ops.
  int64 multiplication wraps modulo 2**64 on CPU and CUDA alike, which is what the
  finaliser needs; right shifts are made logical by masking the sign-extended bits.
"""

import hashlib
from typing import Union

import torch

_MASK63 = (1 << 63) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def derive_seed(seed: int, table: str = "", chunk: int = 0, role: str = "") -> int:
    """A stable 63-bit key for one hash function of the family.

    Args:
        seed: the user's seed (e.g. ``CCEConfig.seed``, bumped at every re-clustering).
        table: logical table name, so tables with the same seed still hash independently.
        chunk: chunk index for chunked methods.
        role: which hash of the method ("h", "p", "q", ...).
    """
    text = f"{int(seed)}|{table}|{int(chunk)}|{role}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (bijective on 64-bit words)."""
    x = (x ^ _logical_shift_right(x, 30)) * _MUL1
    x = (x ^ _logical_shift_right(x, 27)) * _MUL2
    return x ^ _logical_shift_right(x, 31)


def hash_ids(ids: torch.Tensor, key: Union[int, torch.Tensor], rows: int) -> torch.Tensor:
    """Hash int64 ``ids`` with the function ``key`` (from :func:`derive_seed`) into ``[0, rows)``.

    ``key`` may also be a 0-d int64 tensor (e.g. a seed kept as a buffer, so no host sync is
    needed on GPU). Returns an int64 tensor on the ids' device. Any int64 id is valid.
    """
    if rows <= 0:
        raise ValueError(f"hash_ids: rows must be positive, got {rows}")
    offset = _signed(key * 0x9E3779B97F4A7C15) if isinstance(key, int) else key * _GOLDEN
    x = ids.to(torch.int64) + offset
    x = mix64(mix64(x) + _GOLDEN)
    # Drop the sign bit, then reduce: bias is rows / 2**63, negligible for any table size.
    return (x & _MASK63) % rows


def combine_keys(base_key: int, generation: torch.Tensor) -> torch.Tensor:
    """A fresh hash key per ``generation`` (0-d int64 tensor), computed on the tensor's device.

    Used for CCE's ``h_i``: re-clustering bumps the generation to draw a new hash function.
    """
    return mix64(generation.to(torch.int64) * _GOLDEN + _signed(base_key)) & _MASK63


def hash_ids_seeded(
    ids: torch.Tensor, rows: int, seed: int, table: str = "", chunk: int = 0, role: str = ""
) -> torch.Tensor:
    """Convenience: ``hash_ids(ids, derive_seed(seed, table, chunk, role), rows)``."""
    return hash_ids(ids, derive_seed(seed, table, chunk, role), rows)


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """int16 when every value ``< max_value`` fits (``max_value <= 32768``), else int32."""
    return torch.int16 if max_value <= 32768 else torch.int32


