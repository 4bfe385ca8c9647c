"""A decoder-only transformer causal language model written with Keras 3 layers.

Only the public Keras API (``keras.layers``, ``keras.ops``) is used, so the same code runs
on any accelerator the backend supports. Every layer takes a ``dtype`` (a Keras dtype
policy such as ``"mixed_bfloat16"``) and hands it to all of its sublayers: variables are
then created in the policy's variable dtype (float32) and computed in its compute dtype.

Shapes use ``B`` batch, ``T`` sequence, ``D`` model width, ``N`` heads, ``H = D / N`` head
width, ``F`` MLP width and ``V`` vocabulary size.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from kithara_ops.models.rotary import apply_rotary_embedding

_PACKAGE = "kithara_ops"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention with rotary positions and bias-free projections.

    ``q, k, v = x W_q, x W_k, x W_v`` (each ``(B, T, D)`` split into ``N`` heads of width
    ``H``), rotary embedding on ``q`` and ``k``, then per head
    ``softmax(q kᵀ / sqrt(H) + M) v`` with ``M`` masking keys after the query position (and,
    with ``segment_ids``, keys of another packed document), heads concatenated and projected
    by ``W_o``.

    Args:
        d_model: Width ``D`` of the input and output.
        num_heads: Number of heads ``N``; ``D / N`` must be an even integer.
        max_wavelength: Longest rotary wavelength.
        **kwargs: Standard layer arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, d_model: int, num_heads: int, max_wavelength: int = 10000, **kwargs):
        super().__init__(**kwargs)
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(
                f"d_model {d_model} must split into {num_heads} heads of even width "
                "(rotary embedding rotates pairs of dimensions)."
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.max_wavelength = max_wavelength
        dense = {"use_bias": False, "dtype": self.dtype_policy}
        self.query = keras.layers.Dense(d_model, name="query", **dense)
        self.key = keras.layers.Dense(d_model, name="key", **dense)
        self.value = keras.layers.Dense(d_model, name="value", **dense)
        self.output_dense = keras.layers.Dense(d_model, name="output", **dense)

    def build(self, input_shape):
        for layer in (self.query, self.key, self.value, self.output_dense):
            layer.build(input_shape)

    def _split_heads(self, x):
        # dot_product_attention wants (B, T, N, H).
        return ops.reshape(x, (*ops.shape(x)[:-1], self.num_heads, self.head_dim))

    def call(self, x, segment_ids=None, positions=None):
        rotate = lambda t: apply_rotary_embedding(t, self.max_wavelength, positions)  # noqa: E731
        q = rotate(self._split_heads(self.query(x)))
        k = rotate(self._split_heads(self.key(x)))
        v = self._split_heads(self.value(x))
        if segment_ids is None:
            attended = ops.dot_product_attention(q, k, v, is_causal=True)
        else:  # packed documents: a token sees the earlier tokens of its own document only
            length = ops.shape(x)[1]
            causal = ops.tril(ops.ones((length, length), "bool"))
            same = ops.equal(segment_ids[:, :, None], segment_ids[:, None, :])
            mask = ops.logical_and(causal[None], same)[:, None]
            attended = ops.dot_product_attention(q, k, v, mask=mask)
        return self.output_dense(ops.reshape(attended, ops.shape(x)))

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``keras.saving``."""
        return {
            **super().get_config(),
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "max_wavelength": self.max_wavelength,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatedMLP(keras.layers.Layer):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``, all projections bias-free.

    ``silu(z) = z * sigmoid(z)``; ``gate`` and ``up`` map ``D -> F`` and ``down`` maps
    ``F -> D``.

    Args:
        d_model: Width ``D`` of the input and output.
        mlp_dim: Hidden width ``F``.
        **kwargs: Standard layer arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, d_model: int, mlp_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.mlp_dim = mlp_dim
        dense = {"use_bias": False, "dtype": self.dtype_policy}
        self.gate = keras.layers.Dense(mlp_dim, name="gate", **dense)
        self.up = keras.layers.Dense(mlp_dim, name="up", **dense)
        self.down = keras.layers.Dense(d_model, name="down", **dense)

    def build(self, input_shape):
        self.gate.build(input_shape)
        self.up.build(input_shape)
        self.down.build((*input_shape[:-1], self.mlp_dim))

    def call(self, x):
        return self.down(ops.silu(self.gate(x)) * self.up(x))

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``keras.saving``."""
        return {**super().get_config(), "d_model": self.d_model, "mlp_dim": self.mlp_dim}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DecoderBlock(keras.layers.Layer):
    """Pre-norm transformer block.

    ``h = x + drop(attn(rms(x)))`` then ``y = h + drop(mlp(rms(h)))``, with
    ``rms(x) = x / sqrt(mean(x²) + ε) * scale`` over the last axis.

    Args:
        d_model: Width ``D`` of the residual stream.
        num_heads: Attention heads.
        mlp_dim: Hidden width of the gated MLP.
        dropout: Dropout rate on both residual branches (only active when training).
        max_wavelength: Longest rotary wavelength.
        epsilon: ``ε`` of the RMS norms.
        **kwargs: Standard layer arguments (``name``, ``dtype``, ...).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        max_wavelength: int = 10000,
        epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.max_wavelength = max_wavelength
        self.epsilon = epsilon
        policy = self.dtype_policy
        self.norm_1 = keras.layers.RMSNormalization(epsilon=epsilon, name="norm_1", dtype=policy)
        self.attention = CausalSelfAttention(
            d_model, num_heads, max_wavelength, name="attention", dtype=policy
        )
        self.norm_2 = keras.layers.RMSNormalization(epsilon=epsilon, name="norm_2", dtype=policy)
        self.mlp = GatedMLP(d_model, mlp_dim, name="mlp", dtype=policy)
        self.dropout_seed = None

    def build(self, input_shape):
        for layer in (self.norm_1, self.attention, self.norm_2, self.mlp):
            layer.build(input_shape)
        if self.dropout > 0:
            # Created here, inside this block's name scope, so that its state variable gets
            # the stable path ``.../block_i/dropout_seed/seed_generator_state`` (a Dropout
            # layer made in __init__ would get a global, counter-numbered one instead).
            self.dropout_seed = keras.random.SeedGenerator(name="dropout_seed")

    def compute_output_shape(self, input_shape):
        return input_shape

    def _drop(self, x, training):
        if not training or self.dropout_seed is None:
            return x
        return keras.random.dropout(x, self.dropout, seed=self.dropout_seed)

    def call(self, x, segment_ids=None, positions=None, training=None):
        attended = self.attention(self.norm_1(x), segment_ids=segment_ids, positions=positions)
        x = x + self._drop(attended, training)
        return x + self._drop(self.mlp(self.norm_2(x)), training)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``keras.saving``."""
        return {
            **super().get_config(),
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout,
            "max_wavelength": self.max_wavelength,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalLM(keras.Model):
    """Decoder-only transformer: token ids ``(B, T)`` to next-token logits ``(B, T, V)``.

    ``logits = rms(blocks(E[ids])) W_head``, where ``E`` is the ``(V, D)`` token embedding
    and ``W_head`` a separate bias-free ``(D, V)`` projection. Logits are always float32 so
    that the softmax cross-entropy is computed in float32 under a mixed precision policy.

    Args:
        vocab_size: Vocabulary size ``V``.
        d_model: Model width ``D``.
        num_layers: Number of decoder blocks.
        num_heads: Attention heads per block.
        mlp_dim: Hidden width of each gated MLP.
        dropout: Residual dropout rate in every block.
        max_wavelength: Longest rotary wavelength.
        epsilon: ``ε`` of the RMS norms.
        **kwargs: Standard model arguments (``name``, ``dtype``, ...).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        max_wavelength: int = 10000,
        epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.max_wavelength = max_wavelength
        self.epsilon = epsilon
        policy = self.dtype_policy
        self.token_embedding = keras.layers.Embedding(
            vocab_size,
            d_model,
            # Small normal init keeps the first logits near uniform (loss ≈ log V).
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="token_embedding",
            dtype=policy,
        )
        self.blocks = [
            DecoderBlock(
                d_model,
                num_heads,
                mlp_dim,
                dropout=dropout,
                max_wavelength=max_wavelength,
                epsilon=epsilon,
                name=f"block_{i}",
                dtype=policy,
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.RMSNormalization(
            epsilon=epsilon, name="final_norm", dtype=policy
        )
        self.lm_head = keras.layers.Dense(vocab_size, use_bias=False, name="lm_head", dtype=policy)

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        hidden_shape = (*input_shape, self.d_model)
        for block in self.blocks:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        self.lm_head.build(hidden_shape)

    def call(self, token_ids, segment_ids=None, positions=None, training=None):
        x = self.token_embedding(token_ids)
        for block in self.blocks:
            x = block(x, segment_ids=segment_ids, positions=positions, training=training)
        return ops.cast(self.lm_head(self.final_norm(x)), "float32")

    def get_layout_rules(self) -> list[tuple[str, tuple[str | None, ...]]]:
        """FSDP partition rules for this model's variables.

        Each rule is ``(regex, spec)``: a variable whose ``.path`` matches ``regex``
        (``re.search``) is split along the dimensions whose ``spec`` entry names the mesh
        axis ``"fsdp"`` and replicated along ``None`` entries. Every rule shards the ``D``
        dimension, which the built-in sizes keep a multiple of 8 (the vocabulary and MLP
        widths need not be). Norm scales match no rule and stay replicated.

        Returns:
            The rules, first match wins.
        """
        return [
            # Embedding is (V, D); the head is (D, V).
            (r"(^|/)token_embedding/embeddings$", (None, "fsdp")),
            (r"(^|/)lm_head/kernel$", ("fsdp", None)),
            # Attention projections are (D, D); gate/up are (D, F); down is (F, D).
            (r"(^|/)attention/(query|key|value|output)/kernel$", ("fsdp", None)),
            (r"(^|/)mlp/(gate|up)/kernel$", ("fsdp", None)),
            (r"(^|/)mlp/down/kernel$", (None, "fsdp")),
        ]

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for ``keras.saving``."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout,
            "max_wavelength": self.max_wavelength,
            "epsilon": self.epsilon,
        }
