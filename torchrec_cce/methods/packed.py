"""Bit-packed integer arrays: CCE's assignment ``p`` at ``ceil(log2(rows))`` bits per entry.

An ``[n, chunks]`` array of values in ``[0, 2**bits)`` is stored as one little-endian bit stream
in int32 words: entry ``(i, j)`` occupies bits ``[(i * chunks + j) * bits, ... + bits)``, bit
``k`` of the stream being bit ``k % 32`` of word ``k // 32``. The words are the stored form
(state dict, checkpoints, byte counts): ``4 * ceil(n * chunks * bits / 32)`` bytes, so at most
3 bytes per array more than ``ceil(n * chunks * bits / 8)``.

Reading gathers, per id, the (at most three) words its row of ``chunks * bits <= 64`` bits
touches and shifts/masks each entry out of a 64-bit window (wider rows: per entry, the word it
starts in and the next; entries never span more than two words since ``bits <= 31``).
Everything is vectorised torch ops.

A block of ids starting at a multiple of :func:`id_alignment` starts on a word boundary, so an
array can be split by id range into word ranges (how a sharded ``p`` is stored and resharded).
"""

import math

import torch

WORD_BITS = 32
WORD_DTYPE = torch.int32
_MASK32 = (1 << 32) - 1


def bits_for(rows: int) -> int:
    """Bits per entry for values in ``[0, rows)``: ``ceil(log2(rows))`` (0 when ``rows == 1``)."""
    if rows <= 0:
        raise ValueError(f"bits_for: rows must be positive, got {rows}")
    bits = (rows - 1).bit_length()
    if bits >= WORD_BITS:
        raise ValueError(f"packed assignments support rows <= 2**31, got {rows}")
    return bits


def num_words(num_ids: int, chunks: int, bits: int) -> int:
    """int32 words holding ``num_ids x chunks`` entries of ``bits`` bits."""
    return -(-num_ids * chunks * bits // WORD_BITS)


def packed_bytes(num_ids: int, chunks: int, bits: int) -> int:
    """Stored bytes of ``num_ids x chunks`` packed entries (what ``memory_report`` counts)."""
    return num_words(num_ids, chunks, bits) * (WORD_BITS // 8)


def id_alignment(chunks: int, bits: int) -> int:
    """Smallest id count whose packed entries fill whole words (id blocks that are multiples
    of it start on word boundaries)."""
    row = chunks * bits
    return 1 if row == 0 else WORD_BITS // math.gcd(row, WORD_BITS)


def _entry_offsets(local_ids: torch.Tensor, chunks: int, bits: int) -> torch.Tensor:
    """``[n, chunks]`` int64 bit offsets of the entries of ``local_ids``."""
    cols = torch.arange(chunks, device=local_ids.device, dtype=torch.int64)
    return (local_ids.to(torch.int64).unsqueeze(1) * chunks + cols) * bits


def _unsigned(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & _MASK32


def _to_words(values: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` -> int32 words with the same bits."""
    return torch.where(values >= (1 << 31), values - (1 << 32), values).to(WORD_DTYPE)


def unpack(words: torch.Tensor, local_ids: torch.Tensor, chunks: int, bits: int) -> torch.Tensor:
    """Entries of ``local_ids`` (rows of the packed array, ``0 <= id < n``): ``[len, chunks]``
    int64. Ids are not bounds-checked beyond the gather's own check."""
    n = local_ids.numel()
    if bits == 0:
        return torch.zeros(n, chunks, dtype=torch.int64, device=local_ids.device)
    ids = local_ids.to(torch.int64)
    cols = torch.arange(0, chunks * bits, bits, device=ids.device, dtype=torch.int64)
    mask = (1 << bits) - 1
    last = words.numel() - 1
    row = chunks * bits
    if row <= 2 * WORD_BITS:
        # Per id: its row starts at bit s0 of word k0 and ends within words k0..k0+2. Gather
        # the three words once (clamped at the end of the array: never needed there), build
        # the 64-bit windows at bits 0 and 32 of them, take each entry from the window that
        # holds it whole (shift + bits <= 64, so arithmetic shifts bring no sign bits in).
        off0 = ids * row
        k0 = (off0 >> 5).unsqueeze(1)
        s = (off0 & (WORD_BITS - 1)).unsqueeze(1) + cols
        x = _unsigned(torch.take(words, torch.clamp(
            k0 + torch.arange(3, device=ids.device), max=last)))
        win_a = x[:, 0:1] | (x[:, 1:2] << 32)
        win_b = x[:, 1:2] | (x[:, 2:3] << 32)
        return torch.where(s + bits <= 2 * WORD_BITS, win_a >> s,
                           win_b >> (s - WORD_BITS).clamp(min=0)) & mask
    # Wide rows: per entry, its word and the next.
    off = ids.unsqueeze(1) * row + cols
    k = off >> 5
    shift = off & (WORD_BITS - 1)
    lo = _unsigned(torch.take(words, k))
    hi = _unsigned(torch.take(words, torch.clamp(k + 1, max=last)))
    return ((lo | (hi << 32)) >> shift) & mask


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, chunks]`` ints in ``[0, 2**bits)`` -> int32 words (the packed array)."""
    n, chunks = values.shape
    total = num_words(n, chunks, bits)
    if bits == 0 or n == 0:
        return torch.zeros(total, dtype=WORD_DTYPE, device=values.device)
    off = _entry_offsets(torch.arange(n, device=values.device), chunks, bits).flatten()
    vals = values.to(torch.int64).flatten()
    k = off >> 5
    shift = off & (WORD_BITS - 1)
    acc = torch.zeros(total + 1, dtype=torch.int64, device=values.device)
    # Entries are disjoint bit ranges: per-word sums of their bit patterns equal their OR.
    acc.index_add_(0, k, (vals << shift) & _MASK32)
    acc.index_add_(0, k + 1, vals >> (WORD_BITS - shift))  # spill into the next word (or 0)
    return _to_words(acc[:total])


def write(words: torch.Tensor, local_ids: torch.Tensor, values: torch.Tensor, bits: int) -> None:
    """Set the entries of ``local_ids`` (unique rows of the packed array) to ``values``
    (``[len, chunks]``, in ``[0, 2**bits)``), in place; other entries are untouched."""
    if bits == 0 or local_ids.numel() == 0:
        return
    chunks = values.shape[1]
    off = _entry_offsets(local_ids, chunks, bits).flatten()
    vals = values.to(torch.int64).flatten()
    k = off >> 5
    shift = off & (WORD_BITS - 1)
    mask = (1 << bits) - 1
    # Each entry touches word k (bits shift..) and, if it crosses, word k+1. Entries are
    # disjoint bit ranges, so per-word sums of their bit patterns equal their OR.
    spill = shift + bits - WORD_BITS  # > 0: bits that go to word k+1
    crosses = spill > 0
    lo_set = (vals << shift) & _MASK32
    lo_clear = (mask << shift) & _MASK32
    hi_idx = (k + 1)[crosses]
    hi_set = vals[crosses] >> (bits - spill[crosses])
    hi_clear = (1 << spill[crosses]) - 1
    idx = torch.cat([k, hi_idx])
    uniq, inverse = torch.unique(idx, return_inverse=True)
    set_bits = torch.zeros(uniq.numel(), dtype=torch.int64, device=words.device)
    clear_bits = torch.zeros_like(set_bits)
    set_bits.index_add_(0, inverse, torch.cat([lo_set, hi_set]))
    clear_bits.index_add_(0, inverse, torch.cat([lo_clear, hi_clear]))
    current = _unsigned(words[uniq])
    words[uniq] = _to_words((current & (~clear_bits & _MASK32)) | set_bits)
