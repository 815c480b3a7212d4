"""The JAX side of `keras_deq.backend`.

Histories are written with `lax.dynamic_update_slice`, which XLA performs
in place on a loop-carried buffer that nothing reads afterwards.
"""

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

Tensor = jax.Array


def new_history(z0: Tensor, count: int, slots: int) -> Tensor:
    """`count` zero-filled histories of `slots` vectors like each row of z0."""
    batch, dim = z0.shape
    return jnp.zeros((count, batch, slots, dim), z0.dtype)


def write_history(
    history: Tensor, slot: Tensor, values: list[Tensor], after: list[Tensor]
) -> Tensor:
    """Puts `values[i]` (`[B, d]`) into slot `slot` of history `i`.

    `after` orders writes after reads in a TensorFlow graph; JAX arrays
    are values, so there is nothing to order.
    """
    del after
    zero = jnp.zeros((), jnp.asarray(slot).dtype)
    block = jnp.stack(values)[:, :, None, :]
    return jax.lax.dynamic_update_slice(
        history, block, (zero, zero, slot, zero)
    )


def fix_shape(x: Tensor, shape) -> Tensor:
    """`x`, whose shape JAX already knows statically; checks it."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"Expected a tensor of shape {tuple(shape)}. Received: "
            f"shape={tuple(x.shape)}"
        )
    return x


def cholesky_solve(h: Tensor, rhs: Tensor) -> Tensor:
    """h⁻¹ rhs for batched SPD `h`; NaN where the factorisation fails."""
    return cho_solve((jnp.linalg.cholesky(h), True), rhs)
