"""Compiled generation: prefill, then a `lax.while_loop` of one-token steps.

    out = generate(model, [[2, 651, 603], [2, 17]], max_new_tokens=32,
                   temperature=0.8, top_p=0.95, eos_id=1)
    out.tokens          # generated ids only, one list per prompt, cut after EOS/stop
    out.finish_reasons  # "eos" | "stop_sequence" | "length"

Prompts of different lengths are left-padded (segment position -1) to a common
bucketed length, so each row starts its own document and gets exactly what it
would get alone; bucketing bounds recompiles across prompt lengths, and across
``max_new_tokens`` (a multiple of 32 holds the output). Temperature, top-k,
top-p, the EOS id and the seed are traced: changing them recompiles nothing. The decode
loop carries the model state, a fixed output buffer and the per-row stop
bookkeeping, so memory does not grow with the number of generated tokens and
no token makes a host round trip. `stream` runs the same loop a few steps per
device call and yields tokens as they come (the CLI uses it).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm.core import functional
from recurrent_lm.core.model import DecoderLM
from recurrent_lm.sampling import mode, strategies

FINISH_REASONS = ("length", "eos", "stop_sequence")
_RUNNING, _EOS, _STOP = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What `generate` returns.

    Attributes:
      tokens: generated ids only, one list per prompt, cut after the EOS token
        or the stop sequence that ended the row (both kept).
      finish_reasons: per prompt, "eos", "stop_sequence" or "length".
      logprobs: with ``return_logprobs``, the model's log-probability of each
        generated token (from the unscaled logits: independent of temperature,
        top-k and top-p); else None.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None


# The output buffer holds max_new_tokens rounded up to this: nearby lengths share a compile.
NEW_TOKENS_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Static (compile-time) settings of a decode loop: they set shapes."""

    buffer_length: int  # max_new_tokens rounded up to NEW_TOKENS_BUCKET
    stop_sequences: tuple[tuple[int, ...], ...]
    pad_id: int
    vocab_limit: int | None = None

    @property
    def stop_window(self) -> int:
        return max((len(s) for s in self.stop_sequences), default=1)


class SamplingParams(NamedTuple):
    """Traced settings of a decode loop (scalars): any value, one compile."""

    max_new_tokens: jax.Array  # int32
    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; the vocabulary size = no top-k
    top_p: jax.Array  # float32; 1 = no top-p
    eos_id: jax.Array  # int32; -1 = none


class _Carry(NamedTuple):
    state: dict
    tokens: jax.Array  # [batch, max_new_tokens] int32, pad after a row ends
    logprobs: jax.Array  # [batch, max_new_tokens] float32
    step: jax.Array  # tokens generated so far
    reason: jax.Array  # [batch] int32: _RUNNING, _EOS or _STOP
    length: jax.Array  # [batch] int32: tokens generated while running (incl. the last)
    recent: jax.Array  # [batch, stop_window] the last generated tokens (-1 = none)
    key: jax.Array


def _record(carry: _Carry, logits, settings: DecodeSettings, params: SamplingParams) -> _Carry:
    """Chooses the next token of every row from `logits` [batch, vocab]."""
    logits = logits.astype(jnp.float32)
    if settings.vocab_limit is not None:  # ids past it exist only in the padded table
        logits = logits[:, : settings.vocab_limit]
    token = strategies.choose_tokens(
        logits, jax.random.fold_in(carry.key, carry.step),
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
    )
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    running = carry.reason == _RUNNING
    token = jnp.where(running, token, settings.pad_id)
    recent = jnp.concatenate([carry.recent[:, 1:], token[:, None]], axis=1)
    reason = jnp.where(running & (token == params.eos_id), _EOS, carry.reason)
    for stop in settings.stop_sequences:
        tail = recent[:, recent.shape[1] - len(stop):]
        hit = jnp.all(tail == jnp.asarray(stop, jnp.int32), axis=1)
        reason = jnp.where(running & (reason == _RUNNING) & hit, _STOP, reason)
    return carry._replace(
        tokens=jax.lax.dynamic_update_slice(carry.tokens, token[:, None], (0, carry.step)),
        logprobs=jax.lax.dynamic_update_slice(
            carry.logprobs, jnp.where(running, logprob, 0.0)[:, None], (0, carry.step)),
        step=carry.step + 1,
        reason=reason,
        length=carry.length + running.astype(jnp.int32),
        recent=recent,
    )


@functools.partial(jax.jit, static_argnames=("settings", "chunk_size"))
def _prefill(skeleton, params, state, ids, segment_pos, key, sampling: SamplingParams,
             settings: DecodeSettings, chunk_size: int | None) -> _Carry:
    batch, length = ids.shape
    if chunk_size is None or chunk_size >= length:
        logits, state = functional.call(skeleton, params, state, ids, segment_pos, last_position_only=True,
                                        new_streams=True)
    else:
        # A scan over equal chunks: one compiled chunk, activations of one chunk live.
        chunks = lambda a: a.reshape(batch, length // chunk_size, chunk_size).swapaxes(0, 1)

        def body(state, chunk):
            logits, state = functional.call(skeleton, params, state, chunk[0], chunk[1], last_position_only=True)
            return state, logits

        state, logits = jax.lax.scan(body, state, (chunks(ids), chunks(segment_pos)))
        logits = logits[-1]
    carry = _Carry(
        state=state,
        tokens=jnp.full((batch, settings.buffer_length), settings.pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, settings.buffer_length), jnp.float32),
        step=jnp.zeros((), jnp.int32),
        reason=jnp.zeros((batch,), jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
        recent=jnp.full((batch, settings.stop_window), -1, jnp.int32),
        key=key,
    )
    return _record(carry, logits[:, -1], settings, sampling)


@functools.partial(jax.jit, static_argnames=("settings",), donate_argnames=("carry",))
def _decode(skeleton, params, carry: _Carry, until, sampling: SamplingParams,
            settings: DecodeSettings) -> _Carry:
    """One-token steps while ``step < until`` and some row is still running."""

    def cond(carry):
        return (carry.step < until) & jnp.any(carry.reason == _RUNNING)

    def body(carry):
        last = jax.lax.dynamic_slice_in_dim(carry.tokens, carry.step - 1, 1, axis=1)
        logits, state = functional.call(skeleton, params, carry.state, last)
        return _record(carry._replace(state=state), logits[:, 0], settings, sampling)

    return jax.lax.while_loop(cond, body, carry)


# ---------------------------------------------------------------------------
# Host side: validation, padding, results.
# ---------------------------------------------------------------------------


def _check_ids(ids, vocab_size: int, what: str) -> list[int]:
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a sequence of integer token ids.") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{what} has token id {bad[0]} outside the vocabulary range [0, {vocab_size}).")
    return ids


def _settings(vocab_size, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
              stop_sequences=None, pad_id=0, vocab_limit=None) -> tuple[DecodeSettings, SamplingParams]:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if vocab_limit is not None:
        if not isinstance(vocab_limit, (int, np.integer)) or not 1 <= vocab_limit <= vocab_size:
            raise ValueError(
                f"vocab_limit must be an integer in [1, vocab_size={vocab_size}], got {vocab_limit!r}."
            )
        vocab_size = int(vocab_limit)
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in [1, vocab_size={vocab_size}], got {top_k!r}.")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if eos_id is not None:
        eos_id = _check_ids([eos_id], vocab_size, "eos_id")[0]
    pad_id = _check_ids([pad_id], vocab_size, "pad_id")[0]
    stops = []
    for i, stop in enumerate(stop_sequences or ()):
        stop = _check_ids(stop, vocab_size, f"stop_sequences[{i}]")
        if not stop:
            raise ValueError(f"stop_sequences[{i}] is empty.")
        stops.append(tuple(stop))
    settings = DecodeSettings(-(-int(max_new_tokens) // NEW_TOKENS_BUCKET) * NEW_TOKENS_BUCKET,
                              tuple(stops), pad_id, None if vocab_limit is None else int(vocab_limit))
    sampling = SamplingParams(
        max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32),
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(vocab_size if top_k is None else top_k, jnp.int32),
        top_p=jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        eos_id=jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
    )
    return settings, sampling


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int, *, pad_id: int, bucket: int,
                multiple_of: int = 1):
    """Left-pads prompts to a common length: ids and segment positions [batch, L].

    L is the longest prompt rounded up to a multiple of `bucket` (and of
    `multiple_of`); rows beyond the prompts are all padding.
    """
    longest = max(len(p) for p in prompts)
    step = int(np.lcm(bucket, multiple_of))
    length = -(-longest // step) * step
    ids = np.full((batch_size, length), pad_id, np.int32)
    pos = np.full((batch_size, length), -1, np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        pos[row, length - len(prompt):] = np.arange(len(prompt))
    return ids, pos


def _prepare(model, prompts, settings_kwargs, prompt_bucket, prefill_chunk_size):
    if isinstance(model, mode.SamplingLM):
        stateless, batch_size = mode.to_stateless(model), model.batch_size
    elif isinstance(model, DecoderLM):
        stateless, batch_size = model, len(prompts) if isinstance(prompts, Sequence) else 0
    else:
        raise TypeError(f"expected a recurrent_lm model, got {type(model).__name__}.")
    vocab_size = stateless.config.vocab_size
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists (tokenize text first).")
    if len(prompts) > batch_size:
        raise ValueError(
            f"{len(prompts)} prompts but the sampling-mode model holds batch_size={batch_size} rows."
        )
    prompts = [_check_ids(p, vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty; every prompt needs at least one token.")
    settings, sampling = _settings(vocab_size, **settings_kwargs)
    if prompt_bucket < 1:
        raise ValueError(f"prompt_bucket must be a positive integer, got {prompt_bucket!r}.")
    if prefill_chunk_size is not None and prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}.")
    ids, pos = pad_prompts(prompts, batch_size, pad_id=settings.pad_id, bucket=prompt_bucket,
                           multiple_of=prefill_chunk_size or 1)
    skeleton, params, state = _split_sampler(stateless, batch_size, ids.shape[1] + settings.buffer_length)
    return skeleton, params, state, ids, pos, settings, sampling, len(prompts)


# Building the sampling mode walks the whole model with selectors (tens of ms
# for a small model); generation reuses it for the same model object.
_SPLIT_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _split_sampler(model, batch_size: int, max_length: int):
    ref, entries = _SPLIT_CACHE.get(id(model), (None, None))
    if ref is None or ref() is not model:
        entries = {}
        _SPLIT_CACHE[id(model)] = (weakref.ref(model, lambda _, key=id(model): _SPLIT_CACHE.pop(key, None)),
                                   entries)
    key = (batch_size, max_length)
    if key not in entries:
        entries.clear()  # keep one sampling mode per model
        entries[key] = functional.split(mode.to_sampling_mode(model, batch_size=batch_size, max_length=max_length))
    return entries[key]


def _results(carry: _Carry, count: int, return_logprobs: bool) -> GenerationOutput:
    tokens, logprobs, reason, length = jax.device_get(
        (carry.tokens, carry.logprobs, carry.reason, carry.length))
    return GenerationOutput(
        tokens=[[int(t) for t in tokens[row, : length[row]]] for row in range(count)],
        finish_reasons=[FINISH_REASONS[int(reason[row])] for row in range(count)],
        logprobs=(
            [[float(v) for v in logprobs[row, : length[row]]] for row in range(count)]
            if return_logprobs else None
        ),
    )


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    return_logprobs: bool = False,
    pad_id: int = 0,
    prompt_bucket: int = 64,
    prefill_chunk_size: int | None = None,
    vocab_limit: int | None = None,
) -> GenerationOutput:
    """Generates continuations of `prompts` (lists of token ids).

    Args:
      model: an ordinary recurrent_lm model (batch = number of prompts), or a
        `SamplingLM` (its batch size bounds the number of prompts; its own
        state is left untouched: generation starts fresh streams).
      prompts: token ids, e.g. ``tokenizer.encode(text)`` (with BOS).
      max_new_tokens: tokens to generate per prompt at most.
      temperature: 0 is greedy; otherwise sample from softmax(logits / T).
      top_k, top_p: restrict sampling to the k most likely tokens / the
        nucleus of probability p (applied in that order).
      seed: PRNG seed; the same seed gives the same tokens.
      eos_id: a row ends after generating this token.
      stop_sequences: token-id sequences; a row ends after generating one.
      return_logprobs: also return each generated token's log-probability.
      pad_id: filler for left padding and finished rows.
      prompt_bucket: the padded prompt length is a multiple of this (fewer
        recompiles across prompt lengths; padding never changes results).
      prefill_chunk_size: feed the prompt in chunks of this many tokens (less
        activation memory for long prompts); None = one call.
      vocab_limit: generate only ids below it, e.g. the tokenizer's size when
        the model's vocabulary is padded (H3: GPT-2's 50257 of 50264 rows; the
        original's ``generate(vocab_size=...)``); logprobs are then over those
        ids. None = every id of the model.
    """
    skeleton, params, state, ids, pos, settings, sampling, count = _prepare(
        model, prompts,
        dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             eos_id=eos_id, stop_sequences=stop_sequences, pad_id=pad_id, vocab_limit=vocab_limit),
        prompt_bucket, prefill_chunk_size,
    )
    carry = _prefill(skeleton, params, state, ids, pos, jax.random.key(seed), sampling, settings,
                     prefill_chunk_size)
    carry = _decode(skeleton, params, carry, sampling.max_new_tokens, sampling, settings)
    return _results(carry, count, return_logprobs)


def stream(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    steps_per_call: int = 8,
    **kwargs,
) -> Iterator[list[list[int]]]:
    """Like `generate`, yielding each row's newly generated tokens as they come.

    Takes `generate`'s keyword arguments (but ``return_logprobs``). The decode
    loop runs `steps_per_call` tokens per device call (one compiled loop,
    reused); every yield is a list with one list of new tokens per prompt
    (empty for rows that have finished).
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call!r}.")
    if kwargs.pop("return_logprobs", False):
        raise ValueError("stream does not return log-probabilities; use generate.")
    seed = kwargs.pop("seed", 0)
    prompt_bucket = kwargs.pop("prompt_bucket", 64)
    prefill_chunk_size = kwargs.pop("prefill_chunk_size", None)
    skeleton, params, state, ids, pos, settings, sampling, count = _prepare(
        model, prompts, kwargs, prompt_bucket, prefill_chunk_size
    )
    max_new_tokens = int(kwargs["max_new_tokens"])
    carry = _prefill(skeleton, params, state, ids, pos, jax.random.key(seed), sampling, settings,
                     prefill_chunk_size)
    emitted = [0] * count
    while True:
        result = _results(carry, count, False)
        yield [tokens[emitted[row]:] for row, tokens in enumerate(result.tokens)]
        emitted = [len(tokens) for tokens in result.tokens]
        step = int(carry.step)
        if step >= max_new_tokens or all(r != "length" for r in result.finish_reasons):
            return
        carry = _decode(skeleton, params, carry, jnp.asarray(min(step + steps_per_call, max_new_tokens), jnp.int32),
                        sampling, settings)
