"""Label Studio brush RLE: masks to and from the ``rle`` list of a ``brushlabels`` result.

The format is ``@thi.ng/rle-pack`` over the mask flattened row-major as RGBA, four bytes per
pixel. Bit stream, most significant bit first::

    32 bits  number of words (H * W * 4)
     5 bits  word size - 1
    4 x 4    run-size classes - 1
    blocks   1 bit flag (1 = repeat one word ``count`` times, 0 = ``count`` literal words),
             2 bits class, ``count - 1`` in that class's bits, then the word(s)
    padding  zeros to a byte boundary

Label Studio ships a reference in ``label_studio_sdk.converter.brush``. It is pure Python
and builds strings of '0'/'1' characters, which costs ~60-100 ms to encode a 12 Mpx mask
and seconds to decode a busy one; this module does the same work with numpy array operations and
no Python loop per run or per pixel:

- ``encode`` writes exactly the bytes of the SDK's ``mask2rle`` for a 0/255 mask (same
  header, same block choices, same padding), so results can be checked against the SDK byte
  for byte. It works on runs of pixels and never builds the 4x-repeated RGBA array.
- ``decode`` / ``decode_words`` read any valid stream, not only ours: any word size, any run
  classes, literal blocks. Where a block starts depends on every block before it, so
  instead of one walk through the stream the parser starts many walkers at guessed
  positions all over it, steps them together as numpy arrays, and lets the true chain of
  blocks hand over from walker to walker where their walks meet (see ``_walk_window``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from service.errors import RLEError

__all__ = ["MAX_PIXELS", "check_shape", "decode", "decode_words", "encode"]

RLEInput: TypeAlias = "Sequence[int] | bytes | bytearray | memoryview | npt.NDArray[Any]"
"""What ``decode`` accepts: the ``rle`` list of a result, raw bytes, or a uint8 array."""

CHANNELS: Final = 4
"""Bytes per pixel in the stream (RGBA); Label Studio draws pixels whose alpha is non-zero."""

HEADER_BITS: Final = 32 + 5 + 4 * 4
"""Word count, word size, four run-size classes."""

MAX_WORDS: Final = 2**32 - 1
"""The word count is a 32-bit field."""

MAX_PIXELS: Final = MAX_WORDS // CHANNELS
"""Largest H * W whose RGBA word count fits the header."""

# What mask2rle writes: 8-bit words and run classes of 3, 4, 8 and 16 bits.
_WORD_BITS: Final = 8
_CLASS_BITS: Final = (3, 4, 8, 16)
_FOREGROUND: Final = 255
# mask2rle splits a run longer than this many words into chunks of this size.
_MAX_RUN: Final = 1 << 16
# Longest run (words) of class 0, 1, 2, i.e. 8, 16, 256; longer runs take class 3.
_CLASS_LIMITS: Final = tuple(1 << bits for bits in _CLASS_BITS[:3])
# The header after the 32-bit word count: word size - 1, then each class's bits - 1.
_HEADER_TAIL: Final = ((_WORD_BITS - 1) << 16) | sum(
    (bits - 1) << (12 - 4 * i) for i, bits in enumerate(_CLASS_BITS)
)
# Pixels compared per chunk when looking for run boundaries: the comparison's temporary
# then stays in cache, which is ~1.5x faster than one pass over a 12 Mpx mask.
_SCAN_CHUNK: Final = 1 << 20

# The parser walks the stream in windows of this many bits (1 MiB of stream), which bounds
# its per-bit bookkeeping to 32 MiB, with at most this many anchors per window.
_WINDOW_BITS: Final = 1 << 23
_MAX_ANCHORS: Final = 2048
_U64 = np.uint64
_I64 = np.int64


def check_shape(height: int, width: int) -> None:
    """Refuse a mask shape the brush format cannot hold, before any pixel is touched.

    The header stores the word count (H * W * 4) in 32 bits; a bigger mask would wrap
    around and Label Studio would draw garbage. A mask without pixels has no runs at all,
    which the SDK cannot encode either.
    """
    if height < 0 or width < 0:
        raise RLEError(f"mask shape {height}x{width} has a negative side")
    pixels = height * width
    if pixels == 0:
        raise RLEError(f"mask {height}x{width} has no pixels; a brush result needs at least one")
    if pixels > MAX_PIXELS:
        raise RLEError(
            f"mask {height}x{width} has {pixels} pixels; the brush RLE header counts "
            f"H*W*4 words in 32 bits, so at most {MAX_PIXELS} pixels fit"
        )


# --------------------------------------------------------------------------------------
# Encoding


def encode(mask: npt.ArrayLike) -> list[int]:
    """Encode an HxW mask (any non-zero pixel is foreground) as Label Studio's ``rle`` list.

    Foreground pixels become RGBA (255, 255, 255, 255) and background (0, 0, 0, 0), so a 0/1
    or boolean mask is drawn opaque, not at 1/255 opacity. The result equals
    ``label_studio_sdk.converter.brush.mask2rle`` of the same mask as 0/255 uint8.
    """
    return _encode_array(mask).tolist()  # type: ignore[no-any-return]


def _encode_array(mask: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise RLEError(f"mask must be 2-D (height, width), got shape {array.shape}")
    height, width = (int(side) for side in array.shape)
    check_shape(height, width)
    starts, foreground = _pixel_runs(array.reshape(-1))
    pixels = height * width
    words = np.diff(np.append(starts, pixels)) * CHANNELS
    codes, sizes = _run_blocks(words, foreground)
    header = np.array([((pixels * CHANNELS) << 21) | _HEADER_TAIL], dtype=_U64)
    codes = np.concatenate((header, codes))
    sizes = np.concatenate((np.array([HEADER_BITS], dtype=_I64), sizes))
    return _pack_bits(codes, sizes)


def _pixel_runs(flat: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Start index and foreground flag of each run of equal foreground-ness.

    Boundaries are found on the raw values (a mask is almost always 0/255 or bool, so this
    skips a normalising pass over every pixel), then boundaries between two different
    non-zero values are dropped.
    """
    n = flat.size
    found = [np.zeros(1, dtype=_I64)]
    changed = np.empty(min(n, _SCAN_CHUNK), dtype=np.bool_)
    for lo in range(1, n, _SCAN_CHUNK):
        hi = min(lo + _SCAN_CHUNK, n)
        scratch = changed[: hi - lo]
        np.not_equal(flat[lo:hi], flat[lo - 1 : hi - 1], out=scratch)
        found.append(np.flatnonzero(scratch) + lo)
    starts = np.concatenate(found)
    foreground = flat[starts] != 0
    keep = np.empty(starts.size, dtype=np.bool_)
    keep[0] = True
    np.not_equal(foreground[1:], foreground[:-1], out=keep[1:])
    if not keep.all():
        starts, foreground = starts[keep], foreground[keep]
    return starts.astype(_I64, copy=False), foreground


def _run_blocks(
    words: npt.NDArray[np.int64], foreground: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Blocks (code, bit length) for runs of ``words`` words, chosen as mask2rle chooses.

    mask2rle writes every run as one repeat block in the smallest class of 3/4/8 bits that
    holds ``count - 1``; a longer run gets 16-bit blocks of 65536 words and then its
    remainder, which keeps the 16-bit class even when it is short. Runs are never a single
    word here (each pixel is four equal words), so its 1-word literal case does not arise.
    """
    classes = np.searchsorted(np.array(_CLASS_LIMITS, dtype=_I64), words).astype(_I64)
    per_run = np.ones(words.size, dtype=_I64)
    long = classes == 3
    per_run[long] = (words[long] - 1) // _MAX_RUN + 1
    counts = words - (per_run - 1) * _MAX_RUN
    if words.size != int(per_run.sum()):
        last = np.cumsum(per_run) - 1
        counts = np.repeat(counts, per_run)
        full = np.ones(counts.size, dtype=np.bool_)
        full[last] = False
        counts[full] = _MAX_RUN
        classes = np.repeat(classes, per_run)
        foreground = np.repeat(foreground, per_run)
    class_bits = np.array(_CLASS_BITS, dtype=_I64)[classes]
    value = np.where(foreground, _U64(_FOREGROUND), _U64(0))
    sh_count = class_bits.astype(_U64) + _U64(_WORD_BITS)
    # flag 1 | class | count - 1 | value: a repeat block.
    codes = (classes.astype(_U64) | _U64(4)) << sh_count
    codes |= (counts - 1).astype(_U64) << _U64(_WORD_BITS)
    codes |= value
    return codes, class_bits + (3 + _WORD_BITS)


def _pack_bits(
    codes: npt.NDArray[np.uint64], sizes: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint8]:
    """Concatenate bit fields (each at most 64 bits) MSB first, then pad as mask2rle does.

    Each field lands in the 64-bit word holding its first bit and, if it crosses into the
    next word, spills its low bits there. Fields are disjoint, so the fields sharing a word
    are combined by addition, and since they come in order, ``add.reduceat`` over the runs
    of equal word index does it. mask2rle pads with 8 - (bits % 8) zero bits, which is a
    whole zero byte when the stream already ends on a byte boundary.
    """
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    offsets = ends - sizes
    nbytes = total // 8 + 1
    out = np.zeros((nbytes + 7) // 8 + 1, dtype=_U64)
    index = offsets >> 6
    spill = (offsets & 63) + sizes - 64
    crossing = spill > 0
    head = np.where(
        crossing,
        codes >> np.clip(spill, 0, 63).astype(_U64),
        codes << np.clip(-spill, 0, 63).astype(_U64),
    )
    group = np.flatnonzero(np.diff(index, prepend=-1))
    out[index[group]] = np.add.reduceat(head, group)
    if crossing.any():
        out[index[crossing] + 1] |= codes[crossing] << (64 - spill[crossing]).astype(_U64)
    return out.astype(">u8").view(np.uint8)[:nbytes]


# --------------------------------------------------------------------------------------
# Decoding


def decode(rle: RLEInput, height: int, width: int) -> npt.NDArray[np.uint8]:
    """Decode a brush ``rle`` to an HxW uint8 mask: 255 where the alpha byte is non-zero.

    Accepts the ``rle`` list of a result, bytes, or a uint8 array, and any valid stream
    (other word sizes, run classes and literal blocks than ours). The stream must hold
    exactly ``height * width * 4`` words. The mask is built from runs of pixels: the
    RGBA word array is never materialised.
    """
    if height < 0 or width < 0:
        raise RLEError(f"mask shape {height}x{width} has a negative side")
    stream = _Stream(rle)
    if stream.num != height * width * CHANNELS:
        raise RLEError(
            f"RLE holds {stream.num} words but a {height}x{width} mask needs "
            f"{height * width * CHANNELS}"
        )
    values, ends = stream.runs()
    # Pixel p takes the word 4p+3 (its alpha); the pixels whose alpha lies below word
    # index e are the first e // 4.
    pixel_ends = ends // CHANNELS
    lengths = np.diff(pixel_ends, prepend=0)
    alpha = np.where(values != 0, np.uint8(_FOREGROUND), np.uint8(0))
    return np.repeat(alpha, lengths).reshape(height, width)


def decode_words(rle: RLEInput) -> npt.NDArray[np.unsignedinteger[Any]]:
    """The flat decoded word array, like the SDK's ``decode_rle``.

    uint8 for words of up to 8 bits (what Label Studio writes), uint16 or uint32 for wider
    words, as ``@thi.ng/rle-pack`` does. For a mask this is H*W*4 long; ``decode`` gives the
    mask without building it.
    """
    stream = _Stream(rle)
    values, ends = stream.runs()
    dtype = (
        np.uint8 if stream.word_bits <= 8 else np.uint16 if stream.word_bits <= 16 else np.uint32
    )
    return np.repeat(values.astype(dtype), np.diff(ends, prepend=0))


class _Stream:
    """A stream's header, and a table to read a bit field at any position of it."""

    def __init__(self, rle: RLEInput) -> None:
        data = _as_bytes(rle)
        if data.size * 8 < HEADER_BITS:
            raise RLEError(f"RLE of {data.size} bytes is shorter than its 7-byte header")
        self.total_bits = data.size * 8
        self.windows = _windows(data)
        head = int(self.windows[0])
        self.num = head >> 32
        self.word_bits = ((head >> 27) & 31) + 1
        self.class_bits = tuple(((head >> shift) & 15) + 1 for shift in (23, 19, 15, 11))

    def runs(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """Value and exclusive end (word index) of each run; a literal word is a 1-word run."""
        if self.num == 0:
            return np.zeros(0, dtype=_U64), np.zeros(0, dtype=_I64)
        reader = _Reader(self, 0)
        starts = _block_starts(self)
        repeat, counts, payload = reader.fields(starts)
        ws = self.word_bits
        ends = np.cumsum(counts)
        # Blocks are in order, so the ones that fit in the stream are a prefix.
        whole = payload + ws * np.where(repeat, 1, counts) <= self.total_bits
        last = int(np.searchsorted(ends, self.num))
        if last == ends.size or not whole[last]:
            held = int(ends[whole][-1]) if whole.any() else 0
            raise RLEError(
                f"RLE is truncated: its blocks hold {held} of the {self.num} words its "
                "header announces"
            )
        if int(ends[last]) != self.num:
            raise RLEError(
                f"RLE block {last} ends at word {int(ends[last])}, past the {self.num} "
                "words its header announces"
            )
        n = last + 1
        repeat, counts, payload, ends = repeat[:n], counts[:n], payload[:n], ends[:n]
        if repeat.all():
            return reader.read(payload, ws), ends
        # A literal block of c words becomes c one-word runs, each read at its own position.
        items = np.where(repeat, 1, counts)
        block = np.repeat(np.arange(n), items)
        first = np.cumsum(items) - items
        index = np.arange(block.size, dtype=_I64) - first[block]
        values = reader.read(payload[block] + index * ws, ws)
        lengths = np.where(repeat, counts, 1)[block]
        return values, np.cumsum(lengths)


def _as_bytes(rle: RLEInput) -> npt.NDArray[np.uint8]:
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1:
            raise RLEError(f"RLE array must be 1-D, got shape {rle.shape}")
        if rle.dtype == np.uint8:
            return rle
        if rle.dtype.kind not in "iu" or (rle.size and (rle.min() < 0 or rle.max() > 255)):
            raise RLEError(f"RLE array must hold bytes 0..255, got dtype {rle.dtype}")
        return rle.astype(np.uint8)
    if isinstance(rle, int | str):
        raise RLEError(f"RLE must be a list of ints 0..255 or bytes, got {type(rle).__name__}")
    try:
        raw = bytes(rle)
    except (TypeError, ValueError) as exc:
        raise RLEError(f"RLE must be a list of ints 0..255 or bytes: {exc}") from None
    return np.frombuffer(raw, dtype=np.uint8)


def _windows(data: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """For every byte offset, the 64 bits starting there (zeros past the end), as uint64.

    A field of up to 57 bits at any bit position is then one lookup and two shifts. Eight
    extra all-zero windows let the parser look at headers in the final padding.
    """
    padded = np.zeros(data.size + 16, dtype=np.uint8)
    padded[: data.size] = data
    eight = np.lib.stride_tricks.sliding_window_view(padded, 8)[: data.size + 8]
    return np.ascontiguousarray(eight).view(">u8").reshape(-1).astype(_U64)


class _Reader:
    """Reads block headers at bit positions counted from byte ``origin`` of a stream.

    Positions are int64 (numpy indexes fastest with intp, ~3x faster than with uint64);
    the bit arithmetic runs on uint64 views of the same memory, which cost nothing.
    """

    def __init__(self, stream: _Stream, origin: int) -> None:
        ws = stream.word_bits
        classes = list(stream.class_bits) * 2  # indexed by the 3 header bits: flag, class
        literal = [ws] * 4 + [0] * 4
        self.windows = stream.windows[origin:]
        self.longest_repeat = 3 + max(stream.class_bits) + ws
        self.count_shift = np.array([64 - bits for bits in classes], dtype=_U64)
        self.per_count = np.array(literal, dtype=_U64)
        # Header, plus the one word of a repeat block, plus the "+1" of a literal's count.
        self.fixed = np.array(
            [3 + bits + (ws if i >= 4 else 0) + literal[i] for i, bits in enumerate(classes)],
            dtype=_U64,
        )
        self.class_bits = np.array(classes, dtype=_I64)

    def _head(
        self, positions: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
        """The 64 bits at each position, and their top three bits (flag, class)."""
        window = self.windows[positions >> 3]
        window <<= (positions & 7).view(_U64)
        return window, (window >> _U64(61)).view(np.intp)

    def length(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Bit length of the block that would start at each position."""
        window, head = self._head(positions)
        window <<= _U64(3)
        window >>= self.count_shift[head]
        window *= self.per_count[head]
        window += self.fixed[head]
        return window.view(_I64)

    def length_one(self, position: int) -> int:
        """The same for one position (for the rare one-block-at-a-time walk)."""
        return int(self.length(np.array([position], dtype=_I64))[0])

    def fields(
        self, positions: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Repeat flag, word count and first payload bit of the blocks at ``positions``."""
        window, head = self._head(positions)
        counts = ((window << _U64(3)) >> self.count_shift[head]) + _U64(1)
        return head >= 4, counts.view(_I64), positions + 3 + self.class_bits[head]

    def read(self, positions: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.uint64]:
        """The ``bits``-bit field (at most 57 bits) at each position."""
        window, _ = self._head(positions)
        return window >> _U64(64 - bits)


def _block_starts(stream: _Stream) -> npt.NDArray[np.int64]:
    """Bit positions of the blocks of ``stream``, in order, from the header on.

    Where a block starts depends on every block before it, which a Python loop would walk
    one block at a time (the SDK's way: seconds for a busy mask). Instead the stream is
    read in windows of ``_WINDOW_BITS``, each walked by ``_walk_window`` with numpy from
    many places at once. Past the last block the walk runs on through the padding; the
    caller cuts the chain at the word count.
    """
    found: list[npt.NDArray[np.int64]] = []
    entry = HEADER_BITS
    while entry < stream.total_bits:
        origin = entry >> 3
        stop = min(entry + _WINDOW_BITS, stream.total_bits)
        reader = _Reader(stream, origin)
        starts, entry = _walk_window(reader, entry - 8 * origin, stop - 8 * origin)
        found.append(starts + 8 * origin)
        entry += 8 * origin
    if not found:
        return np.zeros(0, dtype=_I64)
    return np.concatenate(found)


def _walk_window(reader: _Reader, entry: int, stop: int) -> tuple[npt.NDArray[np.int64], int]:
    """Block starts in ``[entry, stop)`` given that a block starts at ``entry``.

    Returns them and the start of the first block at or after ``stop``.

    Walkers start on the first M bits after each of K anchors spread over the window (M =
    the longest repeat block, K about sqrt(bits / 16)) and step together as numpy arrays.
    ``owner`` remembers which walker first stood on each bit. A walker that lands where
    another has been has the same future from there, so it stops and records whom it
    joined and where (``joined``, ``joined_at``). The true chain starts with the walker at
    ``entry``; passing an anchor it lands on one of the M bits owned from the start (no
    block is longer, bar long literal blocks), so it joins that anchor's walker, and so on
    to the end of the window. Every walker stops at the next anchor at the latest, so the
    walk takes about one numpy step per block between two anchors.
    Following the ``joined`` pointers from the first walker (one Python step per join, about
    K) says which walker carried the true chain over which bits.

    One walker per anchor would not do: on regular streams (a mask of large blobs is mostly
    27-bit blocks) a walker that starts out of step with the true chain stays so for ever.
    """
    span = stop - entry
    # Fewer anchors mean more numpy steps (one per block between anchors), more anchors
    # more walkers; about sqrt(bits / 16) balances the two (measured on blobs and noise).
    anchors = min(max(int(np.sqrt(span / 16.0)), 1), _MAX_ANCHORS)
    m = reader.longest_repeat
    starts = np.arange(entry, stop, -(-span // anchors), dtype=_I64)[:, None]
    starts = (starts + np.arange(m, dtype=_I64)).reshape(-1)
    starts = starts[starts < stop]
    exits = np.full(starts.size, stop, dtype=_I64)
    joined = np.arange(starts.size, dtype=np.int32)
    joined_at = np.zeros(starts.size, dtype=_I64)
    owner = np.full(stop, -1, dtype=np.int32)

    pos = starts.copy()
    wid = np.arange(starts.size, dtype=np.int32)
    owner[pos] = wid
    while pos.size:
        pos += reader.length(pos)
        keep = pos < stop
        if not keep.all():
            exits[wid[~keep]] = pos[~keep]
            pos, wid = pos[keep], wid[keep]
        seen = owner[pos]
        keep = seen < 0
        if not keep.all():
            joined[wid[~keep]] = seen[~keep]
            joined_at[wid[~keep]] = pos[~keep]
            pos, wid = pos[keep], wid[keep]
        owner[pos] = wid
        # Two walkers that landed on the same new bit in this step: one write won.
        seen = owner[pos]
        keep = seen == wid
        if not keep.all():
            joined[wid[~keep]] = seen[~keep]
            joined_at[wid[~keep]] = pos[~keep]
            pos, wid = pos[keep], wid[keep]

    # Follow the true chain from the walker at ``entry``: who carried it from where to where.
    carriers: list[int] = []
    carried_from: list[int] = []
    carried_to: list[int] = []
    joined_l, joined_at_l = joined.tolist(), joined_at.tolist()
    w, q = 0, entry
    while True:
        carriers.append(w)
        carried_from.append(q)
        if joined_l[w] == w:
            carried_to.append(stop)
            break
        q = joined_at_l[w]
        carried_to.append(q)
        w = joined_l[w]
    lo = np.full(starts.size, stop, dtype=_I64)
    hi = np.zeros(starts.size, dtype=_I64)
    lo[carriers] = carried_from
    hi[carriers] = carried_to
    visited = np.flatnonzero(owner >= 0)
    who = owner[visited]
    return visited[(visited >= lo[who]) & (visited < hi[who])], int(exits[w])
