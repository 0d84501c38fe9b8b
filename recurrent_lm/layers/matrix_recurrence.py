"""The matrix-state recurrence primitive: diagonal-plus-rank-one transitions.

For every head (and batch row: every named axis other than the three below is
batched over by name) the state is a matrix ``S`` of named shape
{value_axis, key_axis} (``M x N``), and along `axis` (default "seq")

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,    y_t = S_t r_t,

with ``w_t = exp(log_decay_t)``; in index form

    S_t[i, j] = sum_m S_{t-1}[i, m] (w_t[m] delta_mj + a_t[m] b_t[j]) + v_t[i] k_t[j]
    y_t[i]    = sum_j S_t[i, j] r_t[j].

This one equation covers the linear-attention family: GLA and RetNet (no
rank-one term, per-channel or scalar decay), Mamba-2's SSD (scalar decay per
head: ``log_decay`` without `key_axis`), DeltaNet / gated DeltaNet
(``a = -beta k``, ``b = k``) and RWKV-7 (``a = -kk``, ``b = kk * iclr``).

Named axes:

* ``r``, ``k``, ``a``, ``b``: {axis, key_axis, ...} (receptance / query, key,
  and the two vectors of the rank-one term);
* ``v``: {axis, value_axis, ...};
* ``log_decay`` (<= 0): {axis, key_axis, ...} (a decay per key channel) or
  {axis, ...} without `key_axis` (one decay per head and step);
* ``h0`` and the returned ``h_last``: {..., value_axis, key_axis};
* ``reset``: bool {axis, ...} (typically {"batch", "seq"}): where True the
  state is zeroed before the step (``S_{t-1} := 0``), so documents packed in
  one row do not see each other;
* ``y``: {axis, value_axis, ...}.

Inputs broadcast by name (an input may lack a batched axis; in the
sequential form a keyed input that lacks one is not repeated along it: the
step broadcasts it, so Mamba-2's B and C stay one per group of heads). Two
forms, same results up to float rounding:

* ``"sequential"``: `jax.lax.scan` over positions, one ``M x N`` state update
  per step: the reference, the decoding path (one step), and the default on
  CPU. The heads (the last batched axis) run in blocks, one after another,
  whose states hold at most `SEQUENTIAL_BLOCK_ELEMENTS` floats (XLA:CPU's
  threading of one large step costs more than it gains on small machines).
* ``"chunked"``: within chunks of ``chunk_size`` positions the transitions are
  folded into matrix products: pairwise decayed scores (C x C), and for the
  rank-one term the WY / UT form, one unit lower-triangular C x C solve per
  chunk (`_chunked` has the algebra); a short `lax.scan` over the T / C chunks
  carries the state from one chunk to the next. The default on GPU / TPU.
  Chunk sizes need not divide T (the last chunk is padded with steps that
  leave the state unchanged); a block of at most 8 positions divides each
  chunk (the largest divisor of ``chunk_size`` up to 8: prefer powers of two).

Without ``a`` and ``b`` (a diagonal transition) both forms skip the rank-one
work (no solve, an elementwise state update across chunks); with a scalar
decay the chunked form computes its decay factors per pair of positions
instead of per pair and key channel.

Measured on a 2-core CPU (``benchmarks/matrix_scan.py``, T = 2048, 12 heads
of 64 x 64) the sequential form was faster than every chunk size, and cannot
be beaten there by this algorithm: at N = 64 the chunked form does 1-3x the
sequential form's FLOPs (its state passes alone, the read-out of the
entering state and the injection ``V^T K``, cost 4 M N per token; a
sequential step costs 5 M N, 9 M N with the rank-one term), and
XLA:CPU runs its typical product (a batch of [C, N] x [N, N]) at only ~2x
the rate the sequential step reaches, so its products alone take about as
long as the whole sequential scan ("batched floor" in the benchmark).
Hence the CPU default.

Why float32, why the log domain. The state is accumulated and kept in float32
(float64 for float64 inputs, `accumulation_dtype`) whatever the input dtype:
a bfloat16 state would lose the slow decays (``w`` close to 1) over a few
hundred steps. ``y`` comes back in the inputs' result dtype, ``h_last`` in the
accumulation dtype, ready to be carried as recurrent state. The chunked form
needs products of decays between two positions, ``prod_{s<u<=t} w_u``, and
computes them as ``exp`` of sums of log-decays, never as ``exp(L_t) *
exp(-L_s)`` with prefix sums ``L`` (``exp(-L_s)`` overflows within a chunk
of strong decays, and the product is then inf * 0): within a block of at most
8 positions as ``exp(min(P_t - P_s, 0))`` of prefix sums ``P`` from the block
start (few terms, so little cancellation), across blocks as products of
factors that are each ``exp`` of a sum over the positions in between (each
<= 1: a small one underflows to 0 only where the true factor does). Every
``exp`` argument is <= 0. Log-decays are clamped at -60 in the chunked form
(``exp(-60) ~ 1e-26``: -inf and -1e30 would make NaN or cancel). A reset is
exact: it masks every pair of positions it separates and the chunk's entering
state after it, and zeroes ``a`` at its position (no -inf anywhere).

Never replace the sums along positions with `jnp.cumsum` along the sequence:
in JAX 0.10 it lowers to `reduce_window`, which XLA:CPU runs in O(T^2)
(``shared/reference/performance.md``); here cumulative sums run only along a
block (<= 8) or the blocks of a chunk, and the sequence is crossed by a scan.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm.core import named
from recurrent_lm.layers.recurrence import accumulation_dtype

MATRIX_SCAN_METHODS: tuple[str, ...] = ("sequential", "chunked")
DEFAULT_CHUNK_SIZE = 64

# Measured per backend (benchmarks/matrix_scan.py; see the module docstring).
# On XLA:CPU the per-step scan wins: the chunked form's small batched products
# and its per-pair decay tensors run far below the machine's matmul rate. On
# accelerators the chunked form is the parallel one (matrix products over all
# chunks at once, a scan of T / C steps); not yet measured there.
_DEFAULT_METHOD_BY_BACKEND = {
    "cpu": "sequential",
    "gpu": "chunked",
    "cuda": "chunked",
    "rocm": "chunked",
    "tpu": "chunked",
}


def default_matrix_scan_method(backend: str | None = None) -> str:
    """The `matrix_scan` form used when none is chosen, for `backend`."""
    backend = backend or jax.default_backend()
    return _DEFAULT_METHOD_BY_BACKEND.get(backend, "chunked")


# ---------------------------------------------------------------------------
# Positional forms: time on axis 0, then the batch axes, then the feature axes.
# ---------------------------------------------------------------------------


def _sequential(r, log_decay, k, v, a, b, h0, reset, dtype):
    """`lax.scan` over positions. Returns (y [T, ..., M], h_last [..., M, N]).

    The decays are exponentiated for all positions at once, and a reset is
    folded into the step's inputs (``w_t = 0``, ``a_t = 0``: the step then
    computes ``v_t k_t^T`` alone, as from a zero state) rather than applied
    to the state: a step then reads and writes the M x N state fewer times
    (RWKV-7's 12 x 64 x 64 at T = 1024 on 2 CPU cores: 21.7 -> 12.4 ms).
    """
    scalar_decay = log_decay.ndim == r.ndim - 1
    w = jnp.exp(log_decay.astype(dtype))
    if reset is not None:
        w = jnp.where(reset if scalar_decay else reset[..., None], 0.0, w)
        if a is not None:
            a = jnp.where(reset[..., None], 0.0, a)

    def step(state, xs):
        r_t, w_t, k_t, v_t, a_t, b_t = xs
        new = state * (w_t[..., None, None] if scalar_decay else w_t[..., None, :])
        if a_t is not None:
            sa = jnp.einsum("...ij,...j->...i", state, a_t.astype(dtype))
            new = new + sa[..., :, None] * b_t.astype(dtype)[..., None, :]
        new = new + v_t.astype(dtype)[..., :, None] * k_t.astype(dtype)[..., None, :]
        y_t = jnp.einsum("...ij,...j->...i", new, r_t.astype(dtype))
        return new, y_t

    h_last, y = jax.lax.scan(step, h0, (r, w, k, v, a, b))
    return y, h_last


# The sequential form scans the heads (the last batched axis) in blocks whose
# states hold at most this many elements, one block after another. On 2
# shared CPU cores XLA splits a large step across threads and the per-step
# hand-off costs more than it gains: Mamba-2 130m's SSD (24 heads x 64 x 128,
# T = 1024) took 87 ms in one loop, 62 / 64 / 60 / 93 ms in blocks of 1 / 2 /
# 4 / 8 heads.
SEQUENTIAL_BLOCK_ELEMENTS = 4 * 64 * 128


def _head_block(h0) -> int:
    """Heads per block of the sequential form (a divisor of h0's last batched
    axis, whose states fit `SEQUENTIAL_BLOCK_ELEMENTS`)."""
    if h0.ndim < 3:
        return 1
    heads = h0.shape[-3]
    per_head = h0.size // heads
    fitting = [d for d in range(1, heads + 1) if not heads % d and d * per_head <= SEQUENTIAL_BLOCK_ELEMENTS]
    return max(fitting, default=1)


def _blocked_sequential(r, log_decay, k, v, a, b, h0, reset, dtype):
    """`_sequential` over blocks of heads (`_head_block`) in turn (`lax.map`).

    Inputs may have size 1 on the heads axis (broadcast: Mamba-2's B and C,
    shared by a group's heads); they are shared by every block.
    """
    heads = h0.shape[-3] if h0.ndim >= 3 else 1
    block = _head_block(h0)
    if block == heads or r.shape[0] == 1:
        return _sequential(r, log_decay, k, v, a, b, h0, reset, dtype)
    count = heads // block
    scalar_decay = log_decay.ndim == r.ndim - 1
    # Position of the heads axis in each input (counted from the end).
    where = {"r": -2, "log_decay": -1 if scalar_decay else -2, "k": -2, "v": -2, "a": -2, "b": -2,
             "h0": -3, "reset": -1}
    inputs = {"r": r, "log_decay": log_decay, "k": k, "v": v, "a": a, "b": b, "h0": h0, "reset": reset}
    mapped, shared = {}, {}
    for name, x in inputs.items():
        if x is None or x.shape[where[name]] == 1:
            shared[name] = x
            continue
        axis = x.ndim + where[name]
        split = x.reshape(*x.shape[:axis], count, block, *x.shape[axis + 1:])
        mapped[name] = jnp.moveaxis(split, axis, 0)

    def run(blocks):
        return _sequential(**{**shared, **blocks}, dtype=dtype)

    y, h_last = jax.lax.map(run, mapped)
    def merge(x, axis):  # [count, ..., block at `axis`, ...] -> [..., heads at `axis`, ...]
        x = jnp.moveaxis(x, 0, axis)
        return x.reshape(*x.shape[:axis], heads, *x.shape[axis + 2:])

    return merge(y, y.ndim - 3), merge(h_last, h_last.ndim - 4)


@functools.partial(jax.jit, static_argnames=("method", "chunk_size"))
def _positional_matrix_scan(r, log_decay, k, v, a, b, h0, reset, *, method, chunk_size):
    dtype = h0.dtype
    if method == "sequential" or r.shape[0] == 1:
        return _blocked_sequential(r, log_decay, k, v, a, b, h0, reset, dtype)
    return _chunked(r, log_decay, k, v, a, b, h0, reset, dtype, chunk_size)


# Chunked form. Positions inside a chunk are split into blocks of at most
# _SUB_BLOCK positions: pairs within a block take their decay factors from a
# [block, block, N] tensor; pairs across blocks factor through the end of the
# earlier block (both factors <= 1), so their scores are matrix products.
_SUB_BLOCK = 8
# Log-decays are clamped here: exp(-60) ~ 1e-26 is 0 next to float32 rounding
# of any state term, and the clamp keeps -inf (and -1e30) out of the sums,
# whose differences would be NaN (or cancel catastrophically).
_LOG_DECAY_FLOOR = -60.0
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _shift(x, axis: int, down: bool):
    """Shifts `x` by one along `axis`, filling with 0: ``down`` turns an
    inclusive prefix sum into an exclusive one, ``not down`` a suffix sum."""
    axis = axis % x.ndim
    size = x.shape[axis]
    if down:
        kept, pad = jax.lax.slice_in_dim(x, 0, size - 1, axis=axis), (1, 0)
    else:
        kept, pad = jax.lax.slice_in_dim(x, 1, size, axis=axis), (0, 1)
    return jnp.pad(kept, [pad if i == axis else (0, 0) for i in range(x.ndim)])


def _cumsum(x, axis: int, reverse: bool = False):
    """Inclusive cumulative sum along a short axis (a block, or the blocks of
    a chunk: never the sequence, where `jnp.cumsum` is O(T^2) on XLA:CPU)."""
    if reverse:
        return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis), axis)
    return jnp.cumsum(x, axis)


class _Decays:
    """Decay factors inside chunks, for `_chunked`.

    `log_decay` is [..., C, N'] (N' = N, or 1 for a scalar decay), split into
    `blocks` blocks of ``c = C // blocks`` positions; `segment` [..., C] (or
    None) counts the resets up to each position of its chunk. Sums of
    log-decays (<= 0) over the positions named:

      from_start:   (chunk start, t]    [..., C, N']  (S_0's weight at t)
      from_start_x: (chunk start, t-1]  [..., C, N']  (S_0's weight in S_{t-1})
      to_end:       (s, chunk end]      [..., C, N']  (s's weight at the end)
      total:        the whole chunk     [..., N']

    Within a block the sums are differences of prefix sums from the block
    start (at most c terms, so their rounding stays at the level of the
    terms); everything that crosses blocks is a sum of the terms in between.
    """

    def __init__(self, log_decay, blocks: int, segment):
        *lead, size, width = log_decay.shape
        self.lead, self.blocks, self.size, self.segment = (
            tuple(lead),
            blocks,
            size,
            segment,
        )
        c = size // blocks
        x = log_decay.reshape(*lead, blocks, c, width)
        self.pre = _cumsum(x, -2)  # (block start, t]
        self.pre_x = _shift(self.pre, -2, down=True)  # (block start, t-1]
        self.suf = _shift(
            _cumsum(x, -2, reverse=True), -2, down=False
        )  # (s, block end]
        tot = self.pre[..., -1, :]  # [..., blocks, N']
        before = _shift(_cumsum(tot, -2), -2, down=True)  # blocks before J
        after = _shift(_cumsum(tot, -2, reverse=True), -2, down=False)  # blocks after I
        # Blocks strictly between I and J: between[..., J, I, :] (0 unless J > I + 1).
        later = jnp.arange(blocks)[:, None] > jnp.arange(blocks)[None, :]  # [K, I]
        terms = jnp.where(later[:, :, None], tot[..., :, None, :], 0)  # [..., K, I, N']
        self.between = _shift(jnp.cumsum(terms, -3), -3, down=True)
        self.total = before[..., -1, :] + tot[..., -1, :]
        flat = lambda y: y.reshape(*lead, size, width)
        self.from_start = flat(self.pre + before[..., None, :])
        self.from_start_x = flat(self.pre_x + before[..., None, :])
        self.to_end = flat(self.suf + after[..., None, :])
        # Within a block, exp((q, p]) for q <= p: [..., blocks, p, q, N'].
        pos = jnp.arange(c)
        self.causal = pos[:, None] >= pos[None, :]
        diff = self.pre[..., :, :, None, :] - self.pre[..., :, None, :, :]
        inner = jnp.exp(jnp.minimum(diff, 0))  # <= 1 everywhere
        self.inner = jnp.where(self.causal[:, :, None], inner, 0)

    def _factors(self, exclusive: bool):
        """exp((s, t']) on the full [..., C, C] grid (scalar decay only)."""
        lead, n, size = self.lead, self.blocks, self.size
        inner = self.inner[..., 0]  # [..., n, p, q]
        if exclusive:
            inner = _shift(inner, -2, down=True)
        if n == 1:
            return inner.reshape(*lead, size, size)
        pre = (self.pre_x if exclusive else self.pre)[..., 0]  # [..., J, p]
        far = (
            jnp.exp(pre)[..., :, :, None, None]
            * jnp.exp(self.between)[..., :, None, :, None, 0]
            * jnp.exp(self.suf)[..., None, None, :, :, 0]
        )  # [..., J, p, I, q]: each factor <= 1
        return self._assemble(far, inner)

    def _assemble(self, far, inner):
        """[..., J, p, I, q] from cross-block and within-block parts."""
        n = self.blocks
        block = jnp.arange(n)
        later = (block[:, None] > block[None, :])[:, None, :, None]  # [J, 1, I, 1]
        same = (block[:, None] == block[None, :])[:, None, :, None]
        return jnp.where(later, far, jnp.where(same, inner[..., :, :, None, :], 0))

    def scores(self, q, keys, exclusive: bool):
        """``out[..., x, t, s] = sum_j q[t, j] keys[x, s, j] exp((s, t'])[j]`` for
        ``s <= t'`` (and no reset in (s, t]), else 0, where ``t' = t - 1`` if
        `exclusive` (then only ``s < t``: reads the state before step t) else
        ``t``. q: [..., C, N]; keys: [..., X, C, N]. Returns [..., X, C, C].
        """
        lead, n, size = self.lead, self.blocks, self.size
        c = size // n
        if self.inner.shape[-1] == 1:  # scalar decay: plain scores times factors
            out = _einsum("...tj,...xsj->...xts", q, keys)
            out = out * self._factors(exclusive).reshape(*lead, 1, size, size)
        else:
            qb = q.reshape(*lead, n, c, q.shape[-1])
            kb = keys.reshape(*lead, keys.shape[-3], n, c, keys.shape[-1])
            inner = _shift(self.inner, -3, down=True) if exclusive else self.inner
            weighted = qb[..., :, :, None, :] * inner  # [..., n, p, q, N]
            near = _einsum("...npqj,...xnqj->...xnpq", weighted, kb)
            if n == 1:
                out = near.reshape(*lead, -1, size, size)
            else:
                # (s, t'] = (s, end of I] + blocks between + (start of J, t'].
                pre = self.pre_x if exclusive else self.pre
                # Each factor is <= 1, so their product is exact (it underflows
                # only where the true factor does).
                q_far = (qb * jnp.exp(pre))[..., :, :, None, :] * jnp.exp(self.between)[
                    ..., :, None, :, :
                ]  # [..., J, p, I, N]
                k_far = kb * jnp.exp(self.suf)[..., None, :, :, :]  # [..., X, I, q, N]
                far = _einsum("...JpIj,...xIqj->...xJpIq", q_far, k_far)
                out = self._assemble(far, near).reshape(*lead, -1, size, size)
        if exclusive:
            pos = jnp.arange(size)
            out = jnp.where(pos[:, None] > pos[None, :], out, 0)
        if self.segment is not None:  # no reset between s and t
            same = self.segment[..., :, None] == self.segment[..., None, :]
            out = jnp.where(same[..., None, :, :], out, 0)
        return out


def _solve_unit_lower(lower, rhs, block: int):
    """Solves ``(I - L) X = rhs`` for strictly lower-triangular `L` [..., C, C].

    By matrix products only: the diagonal blocks of `block` positions are
    inverted as ``(I + L)(I + L^2)(I + L^4)...`` (a strictly lower block is
    nilpotent), then block forward substitution. Not
    `jax.scipy.linalg.solve_triangular`: batched over chunks it took 3 s for
    C = 64 on XLA:CPU (JAX 0.10.2) against 18 ms for a product of the same
    shapes, and products are what accelerators run best.
    """
    size = lower.shape[-1]
    starts = range(0, size, block)
    eye = jnp.eye(block, dtype=lower.dtype)
    solved = []
    for start in starts:
        stop = start + block
        diag = lower[..., start:stop, start:stop]
        inverse, power = eye + diag, diag
        for _ in range(max(0, math.ceil(math.log2(block)) - 1)):
            power = _einsum("...ij,...jk->...ik", power, power)
            inverse = inverse + _einsum("...ij,...jk->...ik", inverse, power)
        part = rhs[..., start:stop, :]
        if start:
            known = jnp.concatenate(solved, -2)
            part = part + _einsum(
                "...ts,...si->...ti", lower[..., start:stop, :start], known
            )
        solved.append(_einsum("...ts,...si->...ti", inverse, part))
    return jnp.concatenate(solved, -2)


def _sub_block(chunk: int) -> int:
    """The largest divisor of `chunk` that is at most `_SUB_BLOCK`."""
    return max(d for d in range(1, min(chunk, _SUB_BLOCK) + 1) if chunk % d == 0)


def _chunked(r, log_decay, k, v, a, b, h0, reset, dtype, chunk_size):
    """Chunks of C positions in matrix products, a `lax.scan` across chunks.

    Inside a chunk entered with state S_0, write u_t = S_{t-1} a_t (the
    rank-one term's read-out). Unrolling the diagonal decays,

      S_t = S_0 D(0,t) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) D(s,t)
      u_t = S_0 D(0,t-1) a_t + sum_{s<t} u_s (a_t . D(s,t-1) b_s) + v_s (a_t . D(s,t-1) k_s)

    with D(s,t) = diag(exp(sum_{s<u<=t} log w_u)). So (I - A_ab) U = X S_0^T +
    A_ak V, a unit lower-triangular C x C system (the WY / UT form): solved
    once per chunk for S_0-independent parts, U = W S_0^T + U_v. Then

      Y   = (R~ + Y_rb W) S_0^T + Y_rb U_v + Y_rk V
      S_C = S_0 (D(0,C) + W^T B~) + U_v^T B~ + V^T K~

    where R~, B~, K~ carry the decays from the chunk start / to the chunk end.
    The scan across chunks applies S_C = S_0 A + B; the outputs are one batched
    product with the states entering each chunk. A reset at t masks every pair
    (s < t <= t') and S_0's terms after it, and zeroes a_t.
    """
    steps, batch_shape = r.shape[0], r.shape[1:-1]
    n_key, n_value = r.shape[-1], v.shape[-1]
    groups = math.prod(batch_shape)
    if log_decay.ndim == r.ndim - 1:  # scalar decay: a key axis of size 1
        log_decay = log_decay[..., None]
    sub = _sub_block(chunk_size)
    chunk = min(chunk_size, -(-steps // sub) * sub)
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps

    def prep(x):  # [T, *batch, w] -> [G, chunks, C, w]; padded steps change nothing
        x = x.reshape(steps, groups, x.shape[-1]).swapaxes(0, 1)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        return x.reshape(groups, num_chunks, chunk, x.shape[-1])

    r, k, v = (prep(x.astype(dtype)) for x in (r, k, v))
    log_decay = jnp.maximum(prep(log_decay.astype(dtype)), _LOG_DECAY_FLOOR)
    rank_one = a is not None
    if rank_one:
        a, b = prep(a.astype(dtype)), prep(b.astype(dtype))
    segment = None
    if reset is not None:  # S_{t-1} := 0: no pair crosses t, S_0 stops at t
        reset = prep(reset[..., None])[..., 0]  # [G, chunks, C]
        segment = jnp.cumsum(reset.astype(jnp.int32), -1)  # short axis
        if rank_one:
            a = jnp.where(reset[..., None], 0, a)

    decays = _Decays(log_decay, chunk // sub, segment)
    r_in, k_out = r * jnp.exp(decays.from_start), k * jnp.exp(decays.to_end)
    end_decay = jnp.exp(decays.total)  # [G, chunks, N']
    if segment is not None:
        first = (segment == 0)[..., None]  # S_0 still reaches t
        last = (segment == segment[..., -1:])[..., None]  # s still reaches the end
        r_in, k_out = jnp.where(first, r_in, 0), jnp.where(last, k_out, 0)
        end_decay = jnp.where(segment[..., -1:] == 0, end_decay, 0)
    if rank_one:
        keys = jnp.stack([k, b], -3)
        y_rk, y_rb = jnp.moveaxis(decays.scores(r, keys, exclusive=False), -3, 0)
        a_ak, a_ab = jnp.moveaxis(decays.scores(a, keys, exclusive=True), -3, 0)
        a_in = a * jnp.exp(decays.from_start_x)
        b_out = b * jnp.exp(decays.to_end)
        if segment is not None:
            a_in, b_out = jnp.where(first, a_in, 0), jnp.where(last, b_out, 0)
        rhs = jnp.concatenate([a_in, _einsum("...ts,...si->...ti", a_ak, v)], -1)
        solved = _solve_unit_lower(a_ab, rhs, sub)
        w_mat, u_v = solved[..., :n_key], solved[..., n_key:]
        q_eff = r_in + _einsum("...ts,...sj->...tj", y_rb, w_mat)
        y_local = _einsum("...ts,...si->...ti", y_rb, u_v) + _einsum(
            "...ts,...si->...ti", y_rk, v
        )
        transition = jnp.eye(n_key, dtype=dtype) * end_decay[..., None, :] + _einsum(
            "...tj,...tl->...jl", w_mat, b_out
        )
        inject = _einsum("...ti,...tj->...ij", u_v, b_out)
        inject = inject + _einsum("...ti,...tj->...ij", v, k_out)
    else:
        y_rk = decays.scores(r, k[..., None, :, :], exclusive=False)[..., 0, :, :]
        q_eff = r_in
        y_local = _einsum("...ts,...si->...ti", y_rk, v)
        transition = end_decay
        inject = _einsum("...ti,...tj->...ij", v, k_out)

    def step(state, xs):
        transition_c, inject_c = xs
        if rank_one:
            new = _einsum("...ij,...jl->...il", state, transition_c)
        else:
            new = state * transition_c[..., None, :]
        return new + inject_c, state

    h_last, entering = jax.lax.scan(
        step,
        h0.reshape(groups, n_value, n_key),
        (jnp.moveaxis(transition, 1, 0), jnp.moveaxis(inject, 1, 0)),
    )
    entering = jnp.moveaxis(entering, 0, 1)  # [G, chunks, M, N]
    y = _einsum("...tj,...ij->...ti", q_eff, entering) + y_local
    y = y.reshape(groups, num_chunks * chunk, n_value)[:, :steps].swapaxes(0, 1)
    return y.reshape(steps, *batch_shape, n_value), h_last.reshape(h0.shape)


# ---------------------------------------------------------------------------
# Named entry point.
# ---------------------------------------------------------------------------


def check_matrix_scan_method(method, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """Raises ValueError for an unknown form or a bad chunk length."""
    if method is not None and method not in MATRIX_SCAN_METHODS:
        raise ValueError(
            f"unknown matrix_scan method {method!r}; choose one of {MATRIX_SCAN_METHODS}"
            " (or None for the backend default)."
        )
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


def _checked_shape(keyed, v, log_decay, h0, reset, a, b, axis, key_axis, value_axis):
    """The checks of `matrix_scan`'s inputs (one line each); their union named shape."""
    if len({axis, key_axis, value_axis}) != 3:
        raise ValueError(
            f"axis, key_axis and value_axis must be three different names; got"
            f" {axis!r}, {key_axis!r}, {value_axis!r}."
        )
    if (a is None) != (b is None):
        raise ValueError(
            "matrix_scan takes both a and b (the rank-one term a b^T) or neither."
        )
    for name, x in keyed.items():
        named.check_named(
            x, (axis, key_axis), f"matrix_scan input {name!r}", exact=False
        )
    named.check_named(v, (axis, value_axis), "matrix_scan input 'v'", exact=False)
    named.check_named(log_decay, (axis,), "matrix_scan input 'log_decay'", exact=False)
    for name, x in [*keyed.items(), ("log_decay", log_decay)]:
        if value_axis in x.named_shape:
            raise ValueError(
                f"matrix_scan input {name!r} must not have the value axis {value_axis!r}"
                f" (named shape {dict(x.named_shape)})."
            )
    if key_axis in v.named_shape:
        raise ValueError(
            f"matrix_scan input 'v' must not have the key axis {key_axis!r}"
            f" (named shape {dict(v.named_shape)})."
        )
    if reset is not None:
        named.check_named(reset, (axis,), "matrix_scan reset", exact=False)
        if reset.dtype != jnp.bool_:
            raise ValueError(
                f"matrix_scan reset must be boolean, got dtype {reset.dtype}."
            )
        if {key_axis, value_axis} & set(reset.named_shape):
            raise ValueError("matrix_scan reset must not have the key or value axis.")
    inputs = [*keyed.values(), v, log_decay, reset]
    shape = named.union_named_shape(*inputs)
    if h0 is not None:
        named.check_named(h0, (value_axis, key_axis), "matrix_scan h0", exact=False)
        if axis in h0.named_shape:
            raise ValueError(f"matrix_scan h0 must not have the scanned axis {axis!r}.")
        named.union_named_shape(h0, *inputs)
        extra = set(h0.named_shape) - set(shape)
        if extra:
            raise ValueError(
                f"matrix_scan h0 has axes {sorted(extra)} that the inputs lack."
            )
    if shape[axis] == 0:
        raise ValueError(f"cannot scan along an empty {axis!r} axis.")
    return shape


def _expanded(x: pz.nx.NamedArray, layout) -> jax.Array:
    """`named.to_positional` without the broadcast: axes of `layout` that `x`
    lacks have size 1."""
    raw = x.unwrap(*[n for n in layout if n in x.named_shape])
    missing = [i for i, n in enumerate(layout) if n not in x.named_shape]
    return jnp.expand_dims(raw, missing) if missing else raw


def matrix_scan(
    r: pz.nx.NamedArray,
    log_decay: pz.nx.NamedArray,
    k: pz.nx.NamedArray,
    v: pz.nx.NamedArray,
    a: pz.nx.NamedArray | None = None,
    b: pz.nx.NamedArray | None = None,
    *,
    axis: str = "seq",
    key_axis: str = "state",
    value_axis: str = "projection",
    h0: pz.nx.NamedArray | None = None,
    reset: pz.nx.NamedArray | None = None,
    method: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """Runs ``S_t = S_{t-1} (diag(exp(log_decay_t)) + a_t b_t^T) + v_t k_t^T``, ``y_t = S_t r_t``.

    See the module docstring for the equation in index form and the forms.

    Args:
      r: read-out vector, {axis, key_axis, ...}.
      log_decay: log of the diagonal decay (<= 0), {axis, key_axis, ...} for a
        decay per key channel, or {axis, ...} without `key_axis` for one decay
        per head and step (the cheaper path).
      k: key, {axis, key_axis, ...}.
      v: value, {axis, value_axis, ...}.
      a, b: the rank-one term ``a_t b_t^T`` of the transition, each {axis,
        key_axis, ...}; both or neither (None: a diagonal transition, the
        cheaper path).
      axis: the named axis to scan along.
      key_axis, value_axis: the named axes of the state's columns and rows.
      h0: optional initial state {..., value_axis, key_axis} (zeros if None).
      reset: optional boolean NamedArray with `axis`; where True the state is
        zeroed before the step.
      method: "sequential", "chunked", or None for the backend default
        (`default_matrix_scan_method`).
      chunk_size: chunk length of the "chunked" form.

    Returns:
      ``(y, h_last)``: ``y`` {axis, value_axis, ...} in the inputs' result
      dtype; ``h_last`` the state after the last step {..., value_axis,
      key_axis} (no `axis`) in the accumulation dtype (float32 or wider).
    """
    check_matrix_scan_method(method, chunk_size)
    keyed = {"r": r, "k": k} | ({} if a is None else {"a": a, "b": b})
    shape = _checked_shape(keyed, v, log_decay, h0, reset, a, b, axis, key_axis, value_axis)

    batch = {n: s for n, s in shape.items() if n not in (axis, key_axis, value_axis)}
    steps, n_key, n_value = shape[axis], shape[key_axis], shape[value_axis]
    keyed_layout = {axis: steps, **batch, key_axis: n_key}
    value_layout = {axis: steps, **batch, value_axis: n_value}
    scalar_layout = {axis: steps, **batch}
    state_layout = {**batch, value_axis: n_value, key_axis: n_key}

    dtypes = [x.dtype for x in (*keyed.values(), v, log_decay)]
    acc_dtype = accumulation_dtype(*dtypes)
    if h0 is None:
        h0_raw = jnp.zeros(tuple(state_layout.values()), acc_dtype)
    else:
        h0_raw = named.to_positional(h0, state_layout).astype(acc_dtype)
    decay_layout = keyed_layout if key_axis in log_decay.named_shape else scalar_layout
    method = method or default_matrix_scan_method()
    if method == "sequential" or steps == 1:
        # Batched axes a keyed input lacks stay of size 1 (the step broadcasts
        # them: Mamba-2's B and C, shared by a group's heads, are not repeated).
        lay_out = lambda x: _expanded(x, keyed_layout)
    else:
        lay_out = lambda x: named.to_positional(x, keyed_layout)
    raw = {name: lay_out(x) for name, x in keyed.items()}
    y, h_last = _positional_matrix_scan(
        raw["r"],
        named.to_positional(log_decay, decay_layout),
        raw["k"],
        named.to_positional(v, value_layout),
        raw.get("a"),
        raw.get("b"),
        h0_raw,
        None if reset is None else named.to_positional(reset, scalar_layout),
        method=method,
        chunk_size=chunk_size,
    )
    y = named.from_positional(y.astype(jnp.result_type(*dtypes)), value_layout)
    return y, named.from_positional(h_last, state_layout)


def materialised_scan(
    log_decay: pz.nx.NamedArray,
    k: pz.nx.NamedArray,
    v: pz.nx.NamedArray,
    a: pz.nx.NamedArray | None = None,
    b: pz.nx.NamedArray | None = None,
    *,
    h0: pz.nx.NamedArray,
    reset: pz.nx.NamedArray,
    keep: pz.nx.NamedArray,
    override: pz.nx.NamedArray,
    axis: str = "seq",
    key_axis: str = "state",
    value_axis: str = "projection",
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """Every state of `matrix_scan`'s recurrence, step by step, with an
    intervention's terms: for interpretability (a state site captured or
    changed), not for long sequences (T x M x N floats per row and head).

    ``S_t = keep_t (S'_{t-1} (diag(exp(log_decay_t)) + a_t b_t^T) + v_t k_t^T)
    + override_t`` with ``S'_{t-1} = 0`` where `reset`, else ``S_{t-1}``
    (``keep = 1, override = 0`` is `matrix_scan`'s recurrence).

    Args:
      log_decay: {axis, key_axis, ...} or {axis, ...} (a scalar decay).
      k, a, b: {axis, key_axis, ...} (a, b: both or neither); v: {axis,
        value_axis, ...}.
      h0: {..., value_axis, key_axis}.
      reset: bool {axis, ...}; keep: {axis, ...}; override: like the states.
      axis, key_axis, value_axis: as for `matrix_scan`.

    Returns:
      ``(states, last)``: {..., axis, value_axis, key_axis} and the state
      after the last step, in float32 (or wider).
    """
    if (a is None) != (b is None):
        raise ValueError("materialised_scan takes both a and b (the rank-one term a b^T) or neither.")
    dtype = accumulation_dtype(log_decay.dtype, k.dtype, v.dtype, h0.dtype)
    cast = lambda x: x.astype(dtype)
    decay_axes = (axis, key_axis) if key_axis in log_decay.named_shape else (axis,)

    def row(w, k, v, h0, reset, keep, override, *rank_one):
        def step(s, inputs):
            w_t, k_t, v_t, reset_t, keep_t, override_t, *ab_t = inputs
            s = jnp.where(reset_t, jnp.zeros_like(s), s)
            new = s * jnp.exp(w_t)
            if ab_t:
                a_t, b_t = ab_t
                new = new + jnp.outer(s @ a_t, b_t)
            new = keep_t * (new + jnp.outer(v_t, k_t)) + override_t
            return new, new

        last, states = jax.lax.scan(step, h0, (w, k, v, reset, keep, override, *rank_one))
        return states, last

    keep = keep + pz.nx.zeros(reset.named_shape, keep.dtype)
    rank_one = [] if a is None else [cast(a).untag(axis, key_axis), cast(b).untag(axis, key_axis)]
    states, last = pz.nx.nmap(row)(
        cast(log_decay).untag(*decay_axes),
        cast(k).untag(axis, key_axis),
        cast(v).untag(axis, value_axis),
        cast(h0).untag(value_axis, key_axis),
        reset.untag(axis),
        cast(keep).untag(axis),
        cast(override).untag(axis, value_axis, key_axis),
        *rank_one,
    )
    return states.tag(axis, value_axis, key_axis), last.tag(value_axis, key_axis)
