"""What every floor of recurrent_lm builds on; imports no architecture.

* `context`: `DocumentContext`, the document cuts of a call, computed once.
* `state`: the state protocol of temporal layers (`StatefulLayer`) and the one
  generic wrapper that carries their state in sampling mode (`Stateful`).
* `sites`: named activation sites (`Site`, `StateSite`) for interpretability.
* `named`: checked moves between named and positional arrays.
* `model`: `DecoderLM`, the decoder shell of every architecture, its input checks.
* `functional`: ``functional(model) -> (apply, params, state)``, a model as a
  pure function (jit, sampling, decoding, training).
* `config`: the base of architecture configs (field rules, presets, dict I/O).
* `registry`: architectures by name, imported on first use.

Submodules are imported explicitly (``from recurrent_lm.core import model``);
this package imports nothing itself, so that `layers` can build on it.
"""
