"""Estimates of the Jacobian of a DEQ block at a point: Frobenius norm, ρ.

Both functions take `f`, mapping a `[B, d]` tensor to `[B, d]` sample by
sample (the DEQ block with its input bound, as the solvers see it), and use
vector-Jacobian products of one evaluation of f, never the dense Jacobian.
"""

from collections.abc import Callable

import keras
from keras import ops

from keras_deq import backend
from keras_deq.backend import Tensor
from keras_deq.utils import validation
from keras_deq.utils.numerics import norm


def linearize(
    f: Callable[[Tensor], Tensor], z: Tensor
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Evaluates f(z) once and returns it with its vector-Jacobian product.

    `vjp(u)` is uᵀ J_f(z) (sample by sample for a per-sample f), computed
    from the single recorded evaluation, as often as needed. The products
    are themselves differentiable (under an outer `tf.GradientTape` on
    TensorFlow; `jax.vjp` composes on JAX).

    Returns:
        `(f(z), vjp)`.

    Examples:

        >>> fz, vjp = linearize(lambda z: z * z, tf.constant([[3.0]]))
        >>> float(fz[0, 0]), float(vjp(tf.ones([1, 1]))[0, 0])
        (9.0, 6.0)
    """
    return backend.linearize(f, z)


def frobenius_estimate(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    num_samples: int = 1,
    seed: "int | keras.random.SeedGenerator | None" = None,
) -> Tensor:
    """Hutchinson estimate of ‖J_f(z)‖_F² / d, per sample.

    For ε ~ N(0, I_d), E‖εᵀ J‖² = tr(J Jᵀ) = ‖J‖_F², so the mean of
    ‖ε_mᵀ J‖² over `num_samples` draws, divided by the state size d, is an
    unbiased estimate of ‖J‖_F² / d. Each draw costs one vector-Jacobian
    product of a single evaluation f(z).

    The result is differentiable with respect to the variables f reads and
    the tensors it closes over (double backpropagation): called under a
    `tf.GradientTape`, the tape records the vector-Jacobian products (on
    JAX, differentiate the function that calls it). `z` itself gets no
    gradient.

    Args:
        f: maps `[B, d]` to `[B, d]`, each sample on its own.
        z: `[B, d]` point at which the Jacobian is taken.
        num_samples: number of Gaussian probes M. Defaults to `1`.
        seed: an int or scalar integer tensor (the same value gives the
            same probes), a
            `keras.random.SeedGenerator` (new probes on every call, also
            inside a compiled function), or `None` (TensorFlow's stateful
            random generator; Keras' global one on JAX).

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
    z = ops.stop_gradient(ops.convert_to_tensor(z))
    if len(z.shape) != 2:
        raise ValueError(
            f"`z` must have shape [batch, d]. Received shape {z.shape}."
        )
    _, vjp = linearize(f, z)
    shape = ops.shape(z)
    d = ops.cast(shape[-1], z.dtype)
    total = ops.zeros(shape[:1], z.dtype)
    for m in range(num_samples):
        eps = backend.normal(shape, z.dtype, seed, m)
        total += ops.sum(ops.square(vjp(eps)), axis=-1)
    return total / (num_samples * d)


def spectral_radius(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    num_iters: int = 50,
    seed: int = 0,
) -> Tensor:
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
    z = ops.stop_gradient(ops.convert_to_tensor(z))
    _, vjp = linearize(f, z)

    def normalize(v):
        return ops.divide_no_nan(v, norm(v, keepdims=True))

    v = normalize(backend.normal(ops.shape(z), z.dtype, seed, 0))
    # The loop variable keeps z's static shape: a block that reshapes
    # internally (the MDEQ's) returns products of unknown shape, which a
    # graph while loop would reject.
    v = ops.while_loop(
        lambda i, v: i < num_iters - 2,
        lambda i, v: (i + 1, backend.fix_shape(normalize(vjp(v)), z.shape)),
        (ops.convert_to_tensor(0, "int32"), v),
    )[1]
    radius = ops.sqrt(norm(vjp(vjp(v))))
    return ops.stop_gradient(radius)
