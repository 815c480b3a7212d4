"""The JAX side of `keras_deq.backend`.

Histories are written with `lax.dynamic_update_slice`, which XLA performs
in place on a loop-carried buffer that nothing reads afterwards.
"""

import jax
import jax.numpy as jnp
import keras
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


def linearize(f, z: Tensor):
    """`(f(z), vjp)` from one evaluation (`jax.vjp`); the products are
    differentiable by JAX's transformations."""
    fz, pullback = jax.vjp(f, z)

    def vjp(u):
        return pullback(u)[0]

    return fz, vjp


def normal(shape, dtype, seed, index: int) -> Tensor:
    """N(0, 1) draws: probe `index` of `seed` (see `jacobian`'s seeds).

    An int or scalar integer array seed gives the key
    `fold_in(key(seed), index)`; `None` Keras' global generator.
    """
    if seed is None or isinstance(seed, keras.random.SeedGenerator):
        return keras.random.normal(shape, dtype=dtype, seed=seed)
    is_int = isinstance(seed, int) and not isinstance(seed, bool)
    if is_int or (
        isinstance(seed, jax.Array)
        and jnp.issubdtype(seed.dtype, jnp.integer)
        and seed.ndim == 0
    ):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.normal(key, tuple(shape), dtype)
    raise TypeError(
        "`seed` must be an int (or a scalar integer array), a "
        "keras.random.SeedGenerator or None. "
        f"Received: seed={seed!r} of type {type(seed).__name__}"
    )
