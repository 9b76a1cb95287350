"""Per-sample random streams, fast: the draws of ``numpy.random.default_rng([seed, i])`` for many
sample ids at once, bit for bit.

A latent that depends only on (seed, i) is drawn from its own generator, seeded by the entropy
``[seed, i]``. Building that generator costs ~13 us per sample, most of it numpy's SeedSequence
hashing the entropy into its pool and the pool into PCG64's 128-bit state and increment, a
few dozen 32-bit multiplies and xor-shifts done in Python-called C one sample at a time. Here
the hashing is done for every id at once on uint32 arrays (the published SeedSequence mixing
of O'Neill's ``seed_seq_fe``, as numpy implements it, constants below), and each sample's
PCG64 is built from its ready-made state words. Then the draws themselves are vectorised where
a sample needs at most ``VECTOR_DRAWS_MAX`` values: PCG64 and the fast path of numpy's ziggurat
run on uint64 arrays for all samples at once, and only the samples with a draw off that path
(~10 % at 8 values) get their own generator object (below; tests/test_scale.py compares every
value with default_rng's).

Entropy words: numpy splits each non-negative int into little-endian 32-bit words (0 is one
word). Ids and seeds below 2**32 are one word each; any other sample falls back to
``default_rng`` itself, so the values never depend on which path drew them.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numpy.random.bit_generator import ISeedSequence

_U32 = np.uint32
_MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875      # hashing entropy into the pool
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED      # hashing the pool into output words
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4                                       # SeedSequence's default pool size (32-bit words)


def _pools(entropy: np.ndarray) -> np.ndarray:
    """SeedSequence pools (m, 4) uint32 of entropy rows (m, L) uint32."""
    m, length = entropy.shape
    h = _INIT_A

    def hashmix(v):
        nonlocal h
        v = v ^ _U32(h)
        h = (h * _MULT_A) & _MASK32
        v = v * _U32(h)
        return v ^ (v >> _U32(16))

    def mix(x, y):
        r = _U32(_MIX_L) * x - _U32(_MIX_R) * y
        return r ^ (r >> _U32(16))

    with np.errstate(over="ignore"):
        mixer = [hashmix(entropy[:, i] if i < length else np.zeros(m, _U32)) for i in range(_POOL)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    mixer[dst] = mix(mixer[dst], hashmix(mixer[src]))
        for src in range(_POOL, length):
            for dst in range(_POOL):
                mixer[dst] = mix(mixer[dst], hashmix(entropy[:, src]))
    return np.stack(mixer, 1)


def _states(pools: np.ndarray, n_words64: int) -> np.ndarray:
    """``SeedSequence.generate_state(n_words64, np.uint64)`` of each pool: (m, n_words64) uint64."""
    h = _INIT_B
    words = []
    with np.errstate(over="ignore"):
        for i in range(2 * n_words64):
            v = pools[:, i % _POOL] ^ _U32(h)
            h = (h * _MULT_B) & _MASK32
            v = v * _U32(h)
            words.append(v ^ (v >> _U32(16)))
    return np.ascontiguousarray(np.stack(words, 1)).view(np.uint64)


class _Ready(ISeedSequence):
    """A seed sequence whose state words are already computed (what PCG64 asks for: 4 uint64)."""
    __slots__ = ("words",)

    def __init__(self, words: np.ndarray):
        self.words = words

    def generate_state(self, n_words, dtype=np.uint32):
        if n_words != 4 or np.dtype(dtype) != np.uint64:   # only PCG64's request is precomputed
            raise ValueError("precomputed PCG64 state only")
        return self.words


def per_sample_normal(seed: int, ids, shape: tuple[int, ...]) -> np.ndarray:
    """(len(ids), *shape) float64: row k is ``default_rng([seed, ids[k]]).standard_normal(shape)``."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    out = np.empty((len(ids), *shape), np.float64)
    if not len(ids):
        return out
    small = (ids >= 0) & (ids <= _MASK32) & (0 <= seed <= _MASK32)
    fast = np.flatnonzero(small)
    if len(fast):
        entropy = np.stack([np.full(len(fast), seed, _U32), ids[fast].astype(_U32)], 1)
        states = _states(_pools(entropy), 4)
        n = math.prod(shape)
        consts = _constants() if 0 < n <= VECTOR_DRAWS_MAX else None
        if consts is not None:
            drawn = _vector_normal(states, n, consts)
            slow = np.isnan(drawn).any(axis=1)
            out[fast[~slow]] = drawn[~slow].reshape(-1, *shape)
            fast, states = fast[slow], states[slow]
        pcg, gen = np.random.PCG64, np.random.Generator
        for k, words in zip(fast, states):
            out[k] = gen(pcg(_Ready(words))).standard_normal(shape)
    for k in np.flatnonzero(~small):
        out[k] = np.random.default_rng([int(seed), int(ids[k])]).standard_normal(shape)
    return out


# ---- the draws, vectorised -----------------------------------------------------------------
# numpy's PCG64 (XSL-RR) and Generator.standard_normal (a 256-level ziggurat), for all samples
# at once on their fast path: PCG64 steps its 128-bit state s -> s * MULT + inc and outputs
# rotr64(hi ^ lo, hi >> 58) of the new state; a normal draw takes one 64-bit output r, layer
# idx = r & 0xff, sign = bit 8, rabs = the next 52 bits, and returns +-rabs * w[idx] when
# rabs < k[idx] (~99.3 % of draws). A sample any of whose draws leaves that path (it would then
# consume more outputs) is drawn by its own Generator instead, so every value is numpy's.
# The multiplier and the tables w, k are read from numpy itself (:func:`_constants`, by setting
# PCG64 states whose next output is a chosen word), not copied, and checked against
# default_rng before first use; if the check fails, the vectorised path is never taken.
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
VECTOR_DRAWS_MAX = 64        # values per sample up to which the fast path is tried (0.993**64 ~ 64 % fast)


def _mulhi64(a, b):
    a0, a1, b0, b1 = a & _LOW32, a >> np.uint64(32), b & _LOW32, b >> np.uint64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & _LOW32) + (p10 & _LOW32)
    return p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))


def _mul128(hi, lo, mhi, mlo):
    return _mulhi64(lo, mlo) + lo * mhi + hi * mlo, lo * mlo


def _add128(hi, lo, bhi, blo):
    s = lo + blo
    return hi + bhi + (s < lo).astype(np.uint64), s


def _xsl_rr(hi, lo):
    r = hi >> np.uint64(58)
    x = hi ^ lo
    return (x >> r) | (x << ((np.uint64(64) - r) & np.uint64(63)))


def _split(v: int):
    return np.uint64(v >> 64), np.uint64(v & 0xFFFFFFFFFFFFFFFF)


_PROBE = 0x5851F42D4C957F2D * 2 + 1              # the probe generator's increment (any odd number)


def _fast_draw(word: int, mult: int, bg, gen):
    """numpy's standard_normal from a PCG64 (``bg``, ``gen`` its Generator) set to the state whose
    next output is ``word``, and whether it used that output alone."""
    hi = 0x0123456789ABCDEF                     # any high half; its top 6 bits are the rotation
    rot = hi >> 58
    lo = (((word << rot) | (word >> (64 - rot))) & 0xFFFFFFFFFFFFFFFF) ^ hi
    after = (hi << 64) | lo                     # output(after) == word
    before = ((after - _PROBE) * pow(mult, -1, 2**128)) % 2**128
    bg.state = {"bit_generator": "PCG64", "state": {"state": before, "inc": _PROBE}, "has_uint32": 0, "uinteger": 0}
    x = gen.standard_normal()
    return x, bg.state["state"]["state"] == after


@functools.cache
def _constants():
    """(MULT hi, MULT lo, w (256,) float64, k (256,) uint64), or None if numpy's generators do not
    behave as described above (then nothing is vectorised)."""
    try:
        bg = np.random.PCG64(0)
        st = bg.state
        st["state"] = {"state": 1, "inc": 1}
        bg.state = st
        bg.random_raw()
        mult = bg.state["state"]["state"] - 1          # 1 * MULT + 1
        gen = np.random.Generator(bg)

        def draw(word):
            return _fast_draw(word, mult, bg, gen)
        w = np.empty(256, np.float64)
        k = np.empty(256, np.uint64)
        for idx in range(256):
            x, fast = draw((1 << 9) | idx)       # rabs = 1, sign +: x = w[idx] exactly
            if not fast:                               # a layer with no fast path (numpy's k[1] is 0):
                w[idx] = 0.0                           # rabs = 0 gives +-0 whatever w is
                k[idx] = 1 if draw(idx)[1] else 0
                continue
            w[idx] = x
            lo, hi = 1, 1 << 52                        # fast for rabs = lo; find the first slow rabs
            if draw(((hi - 1) << 9) | idx)[1]:
                k[idx] = hi
                continue
            hi -= 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if draw((mid << 9) | idx)[1]:
                    lo = mid
                else:
                    hi = mid
            k[idx] = hi
        consts = (*_split(mult), w, k)
        ids = np.arange(256, dtype=np.int64) * 7919
        ref = np.stack([np.random.default_rng([5, int(i)]).standard_normal(4) for i in ids])
        got = _vector_normal(_states(_pools(np.stack([np.full(256, 5, _U32), ids.astype(_U32)], 1)), 4), 4, consts)
        fast = ~np.isnan(got).any(axis=1)
        return consts if fast.mean() > 0.8 and np.array_equal(got[fast], ref[fast]) else None
    except Exception:  # noqa: BLE001 - any surprise: keep the one-generator-per-sample path
        return None


def _vector_normal(states: np.ndarray, n: int, consts) -> np.ndarray:
    """(m, n) standard normals of PCG64s seeded with ``states`` (m, 4) uint64 (generate_state's
    words); rows with a draw off the fast path are NaN (the caller redraws them)."""
    mhi, mlo, w, k = consts
    with np.errstate(over="ignore"):
        ihi, ilo = states[:, 2].copy(), states[:, 3].copy()         # initseq; inc = initseq << 1 | 1
        inc_hi = (ihi << np.uint64(1)) | (ilo >> np.uint64(63))
        inc_lo = (ilo << np.uint64(1)) | np.uint64(1)
        hi, lo = _add128(inc_hi, inc_lo, states[:, 0], states[:, 1])  # 0 * MULT + inc, + initstate
        hi, lo = _add128(*_mul128(hi, lo, mhi, mlo), inc_hi, inc_lo)
        out = np.empty((len(states), n), np.float64)
        ok = np.ones(len(states), bool)
        for j in range(n):
            hi, lo = _add128(*_mul128(hi, lo, mhi, mlo), inc_hi, inc_lo)
            r = _xsl_rr(hi, lo)
            idx = (r & np.uint64(0xFF)).astype(np.intp)
            rabs = (r >> np.uint64(9)) & np.uint64(0x000FFFFFFFFFFFFF)
            x = rabs.astype(np.float64) * w[idx]
            out[:, j] = np.where((r >> np.uint64(8)) & np.uint64(1), -x, x)
            ok &= rabs < k[idx]
    out[~ok] = np.nan
    return out
