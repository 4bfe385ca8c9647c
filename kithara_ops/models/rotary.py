"""Rotary position embedding (RoPE) for attention queries and keys, in ``keras.ops``."""

from __future__ import annotations

from typing import Any

from keras import ops


def apply_rotary_embedding(x: Any, max_wavelength: int = 10000, positions: Any = None) -> Any:
    """Rotate query or key vectors by their position (rotary position embedding, RoPE).

    For position ``t`` and frequency index ``i < H/2``, with
    ``θ_i = max_wavelength^(-2i/H)``, the two halves ``x = [x1, x2]`` of each head vector
    become::

        x' = x * cos(t·θ) + rotate_half(x) * sin(t·θ),   rotate_half(x) = [-x2, x1]

    where ``θ`` is ``[θ_0..θ_{H/2-1}]`` repeated twice. The dot product of a rotated query
    at position ``s`` with a rotated key at ``t`` then depends on ``s - t`` only.

    Args:
        x: Array of shape ``(B, T, N, H)`` with an even ``H``.
        max_wavelength: Longest wavelength of the rotation frequencies.
        positions: ``(B, T)`` position of each token (packed documents restart theirs);
            ``None``: ``0..T-1`` in every row.

    Returns:
        An array of the same shape and dtype as ``x``.
    """
    seq_len, head_dim = ops.shape(x)[1], ops.shape(x)[-1]
    # Angles in float32: bfloat16 cannot represent positions beyond 256 exactly.
    exponent = ops.arange(0, head_dim // 2, dtype="float32") * (2.0 / head_dim)
    inv_freq = ops.power(float(max_wavelength), -exponent)
    if positions is None:
        positions = ops.arange(seq_len, dtype="float32")[None, :]
    angles = ops.einsum("bt,f->btf", ops.cast(positions, "float32"), inv_freq)
    angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]
    xf = ops.cast(x, "float32")
    x1, x2 = ops.split(xf, 2, axis=-1)
    rotated = ops.concatenate([-x2, x1], axis=-1)
    out = xf * ops.cos(angles) + rotated * ops.sin(angles)
    return ops.cast(out, x.dtype)
