"""DEQLayer.solve: the layer's forward solver on a map given by the caller."""

import numpy as np
import tensorflow as tf

from keras_deq.layers import DEQLayer
from tests.blocks import TanhCell


def fixed_point(cell, x, iterations=300):
    """Reference: plain iteration of the (contractive) cell, in float64."""
    w, u, b = (v.numpy().astype(np.float64) for v in (cell.w, cell.u, cell.b))
    z = np.zeros((x.shape[0], w.shape[0]))
    for _ in range(iterations):
        z = np.tanh(z @ w + x @ u + b)
    return z


def test_solve_finds_the_fixed_point_of_a_bound_map():
    """solve(f) with a second input bound into f, against plain iteration
    of the same map, with the layer's own settings (its tol)."""
    cell = TanhCell(units=6, w_norm=0.6)
    layer = DEQLayer(cell, max_iter=40, tol=1e-6)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    layer(x)
    shift = tf.constant(np.linspace(-1, 1, 3), tf.float32)
    z_star, result = layer.solve(lambda z: cell(z, x + shift), tf.zeros([4, 6]))
    np.testing.assert_allclose(
        z_star, fixed_point(cell, x + shift.numpy()), atol=1e-5
    )
    assert result.nstep.shape == (4,)
    assert (result.rel_residual.numpy() < 1e-6).all()
    assert (result.nstep.numpy() < 40).all()
