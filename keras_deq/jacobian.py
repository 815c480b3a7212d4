"""Estimates of the Jacobian of a DEQ block at a point: Frobenius norm, ρ.

Both functions take `f`, mapping a `[B, d]` tensor to `[B, d]` sample by
sample (the DEQ block with its input bound, as the solvers see it), and use
vector-Jacobian products of one evaluation of f, never the dense Jacobian.
"""

from collections.abc import Callable

import keras
import tensorflow as tf

from keras_deq import backend as _backend
from keras_deq.utils import validation

_backend.require_tensorflow(__name__)


def linearize(
    f: Callable[[tf.Tensor], tf.Tensor], z: tf.Tensor
) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """Evaluates f(z) once and returns it with its vector-Jacobian product.

    `vjp(u)` is uᵀ J_f(z) (sample by sample for a per-sample f), computed
    from the single recorded evaluation, as often as needed. Under an outer
    `tf.GradientTape` the products are themselves differentiable.

    Returns:
        `(f(z), vjp)`.

    Examples:

        >>> fz, vjp = linearize(lambda z: z * z, tf.constant([[3.0]]))
        >>> float(fz[0, 0]), float(vjp(tf.ones([1, 1]))[0, 0])
        (9.0, 6.0)
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        fz = f(z)

    def vjp(u):
        return tape.gradient(
            fz,
            z,
            output_gradients=u,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    return fz, vjp


def frobenius_estimate(
    f: Callable[[tf.Tensor], tf.Tensor],
    z: tf.Tensor,
    num_samples: int = 1,
    seed: "int | keras.random.SeedGenerator | None" = None,
) -> tf.Tensor:
    """Hutchinson estimate of ‖J_f(z)‖_F² / d, per sample.

    For ε ~ N(0, I_d), E‖εᵀ J‖² = tr(J Jᵀ) = ‖J‖_F², so the mean of
    ‖ε_mᵀ J‖² over `num_samples` draws, divided by the state size d, is an
    unbiased estimate of ‖J‖_F² / d. Each draw costs one vector-Jacobian
    product of a single evaluation f(z).

    The result is differentiable with respect to the variables f reads and
    the tensors it closes over (double backpropagation): called under a
    `tf.GradientTape`, the tape records the vector-Jacobian products. `z`
    itself gets no gradient.

    Args:
        f: maps `[B, d]` to `[B, d]`, each sample on its own.
        z: `[B, d]` point at which the Jacobian is taken.
        num_samples: number of Gaussian probes M. Defaults to `1`.
        seed: an int or scalar integer tensor (the same value gives the
            same probes), a
            `keras.random.SeedGenerator` (new probes on every call, also
            inside a compiled function), or `None` (TensorFlow's stateful
            random generator).

    Returns:
        `[B]` estimates, in the dtype of `z`.

    Examples:

        For f(z) = 2z in R³, ‖J‖_F² / d = 4:

        >>> a = tf.constant(2.0 * np.eye(3), tf.float32)
        >>> est = frobenius_estimate(
        ...     lambda z: z @ a, tf.ones([1, 3]), num_samples=4000, seed=0
        ... )
        >>> abs(float(est[0]) - 4.0) < 0.25
        True

    Reference:
        Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML 2021, eq. 3–4.
    """
    validation.check_int("num_samples", num_samples, 1)
    z = tf.stop_gradient(tf.convert_to_tensor(z))
    if z.shape.rank != 2:
        raise ValueError(
            f"`z` must have shape [batch, d]. Received shape {z.shape}."
        )
    _, vjp = linearize(f, z)
    d = tf.cast(tf.shape(z)[-1], z.dtype)
    total = tf.zeros(tf.shape(z)[:1], z.dtype)
    for m in range(num_samples):
        eps = _normal(tf.shape(z), z.dtype, seed, m)
        total += tf.reduce_sum(tf.square(vjp(eps)), axis=-1)
    return total / (num_samples * d)


def spectral_radius(
    f: Callable[[tf.Tensor], tf.Tensor],
    z: tf.Tensor,
    num_iters: int = 50,
    seed: int = 0,
) -> tf.Tensor:
    """Power-method estimate of ρ(J_f(z)), per sample.

    Iterates v ← vᵀJ / ‖vᵀJ‖ (the spectrum of Jᵀ is that of J) from a
    Gaussian v, with vector-Jacobian products of one evaluation f(z), and
    returns √(‖vᵀJ²‖ / ‖v‖) for the last two steps. That equals ρ when one
    real eigenvalue dominates, and also when the top two are ±λ; for a
    dominant complex pair it is an estimate that oscillates around ρ.

    Args:
        f: maps `[B, d]` to `[B, d]`, each sample on its own.
        z: `[B, d]` point at which the Jacobian is taken.
        num_iters: vector-Jacobian products (at least 2). Defaults to `50`.
        seed: seed of the starting vector. Defaults to `0`.

    Returns:
        `[B]` estimates of ρ(J_f(z)), in the dtype of `z`, with no gradient.

    Examples:

        >>> d = tf.constant(np.diag([0.5, -0.9, 0.2]), tf.float32)
        >>> f = lambda z: z @ d
        >>> rho = spectral_radius(f, tf.ones([2, 3]), num_iters=100)
        >>> [round(float(r), 4) for r in rho]
        [0.9, 0.9]

    Reference:
        Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML 2021, §5.4.
    """
    validation.check_int("num_iters", num_iters, 2)
    z = tf.stop_gradient(tf.convert_to_tensor(z))
    _, vjp = linearize(f, z)

    def normalize(v):
        return tf.math.divide_no_nan(v, tf.norm(v, axis=-1, keepdims=True))

    v = normalize(_normal(tf.shape(z), z.dtype, seed, 0))
    # The loop variable keeps z's static shape: a block that reshapes
    # internally (the MDEQ's) returns products of unknown shape, which a
    # graph while loop would reject.
    v = tf.while_loop(
        lambda i, v: i < num_iters - 2,
        lambda i, v: (i + 1, tf.ensure_shape(normalize(vjp(v)), z.shape)),
        (tf.constant(0), v),
    )[1]
    radius = tf.sqrt(tf.norm(vjp(vjp(v)), axis=-1))
    return tf.stop_gradient(radius)


def _normal(shape, dtype, seed, index):
    if seed is None:
        return tf.random.normal(shape, dtype=dtype)
    if isinstance(seed, keras.random.SeedGenerator):
        return keras.random.normal(shape, dtype=dtype, seed=seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        return tf.random.stateless_normal(shape, [seed, index], dtype=dtype)
    if tf.is_tensor(seed) and seed.dtype.is_integer and seed.shape.rank == 0:
        key = tf.stack([tf.cast(seed, tf.int64), tf.constant(index, tf.int64)])
        return tf.random.stateless_normal(shape, key, dtype=dtype)
    raise TypeError(
        "`seed` must be an int (or a scalar integer tensor), a "
        "keras.random.SeedGenerator or None. "
        f"Received: seed={seed!r} of type {type(seed).__name__}"
    )
