"""One module per architecture: its config, presets and ``build_model``.

Import the one you use (``from recurrent_lm.models import griffin``); by name,
`recurrent_lm.core.registry.get` imports it on first use. This package imports
no architecture itself.
"""
