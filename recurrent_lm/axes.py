"""The named-axis vocabulary shared by every layer and model in recurrent_lm.

Every array that crosses a layer boundary is a `penzai.pz.nx.NamedArray` whose
axes carry one of these names. Layers state which names they read and write in
their docstrings; sharding rules, converters and interpretability tools refer to
axes by these names and never by position.

=============  ================================================================
name           meaning
=============  ================================================================
batch          independent sequences (rows)
seq            token position within a row (the recurrence / causal axis)
kv_seq         key position, when queries and keys are both laid out in time
embedding      model width (residual stream), ``hidden_size``
vocabulary     token ids / logits
heads          query heads, and RG-LRU gate blocks
kv_heads       key/value heads (1 for multi-query attention)
projection     per-head feature dimension (``head_dim``)
mlp            hidden width of one branch of a gated MLP
lru            width of the RG-LRU recurrence (``lru_width``)
block_in       input features of one block of a block-diagonal linear layer
block_out      output features of one block of a block-diagonal linear layer
conv_taps      taps of a causal depthwise convolution (oldest first)
state          width of a state-space model's hidden state
layers         stacked per-layer results (e.g. a captured residual stream)
wkv            width of RWKV's WKV recurrence (``attention_hidden_size``)
wkv_state      parts of a captured WKV state: numerator and denominator
               mantissas, and their shared log-scale (size 3)
embedding_in   model width as the input of a square embedding -> embedding map
lora_rank      rank of a LoRA adapter (`recurrent_lm.lora`)
positions      rows of a learned position-embedding table (one per position
               in a document)
low_rank       inner width of a built-in low-rank projection (RWKV-7's decay,
               in-context rate, value-residual and gate paths); not LoRA's
stack          repeats of a scanned group of blocks: the leading axis of its
               stacked parameters (`recurrent_lm.core.stack`)
inner          Mamba's expanded width (``intermediate_size``); in Mamba-1
               every channel is its own state-space model
groups         groups of Mamba-2 heads that share one B and one C
               (``n_groups``): head h reads group h // (heads / groups)
fused          the outputs of a fused projection laid end to end (Mamba's
               ``in_proj`` and ``x_proj``, the channels of Mamba-2's
               convolution over x, B, C), split by position into their parts
=============  ================================================================
"""

BATCH = "batch"
SEQ = "seq"
KV_SEQ = "kv_seq"
EMBEDDING = "embedding"
VOCABULARY = "vocabulary"
HEADS = "heads"
KV_HEADS = "kv_heads"
PROJECTION = "projection"
MLP = "mlp"
LRU = "lru"
BLOCK_IN = "block_in"
BLOCK_OUT = "block_out"
CONV_TAPS = "conv_taps"
STATE = "state"
LAYERS = "layers"
WKV = "wkv"
WKV_STATE = "wkv_state"
EMBEDDING_IN = "embedding_in"
LORA_RANK = "lora_rank"
POSITIONS = "positions"
LOW_RANK = "low_rank"
STACK = "stack"
INNER = "inner"
GROUPS = "groups"
FUSED = "fused"

TOKEN_AXES = (BATCH, SEQ)
"""Named axes of model inputs (token ids and segment positions)."""
