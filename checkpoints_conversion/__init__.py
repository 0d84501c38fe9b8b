"""Loaders and exporters for official checkpoint formats, one module per format.

Converters depend on `recurrent_lm.models`, never the reverse.
"""
