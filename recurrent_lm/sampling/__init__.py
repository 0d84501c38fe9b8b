"""Stateful sampling mode and generation, for every architecture.

* `to_sampling_mode(model, batch_size=...)`: the model with its temporal layers
  each wrapped to carry its state (`SamplingLM`); call it on chunks of any length.
* `recurrent_lm.functional(sampler)`: the same as a pure ``apply(params,
  state, ids)`` (re-exported here as `functional`).
* `generate(model, prompts, max_new_tokens=...)`: compiled decoding with
  temperature / top-k / top-p, EOS and stop sequences, ragged batches;
  `stream` yields the tokens as they come.
"""

from recurrent_lm.core.functional import functional
from recurrent_lm.sampling.decode import GenerationOutput, generate, stream
from recurrent_lm.sampling.mode import SamplingLM, to_sampling_mode, to_stateless

__all__ = [
    "GenerationOutput",
    "SamplingLM",
    "functional",
    "generate",
    "stream",
    "to_sampling_mode",
    "to_stateless",
]
