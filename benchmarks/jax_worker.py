"""keras_deq on Keras' JAX backend, for `compare_torchdeq.py`.

`compare_torchdeq.py` runs TensorFlow in its own process; a process has
one Keras backend, so it drives this one (started with
`KERAS_BACKEND=jax`) over a pipe, one JSON request and answer per line,
as it drives the TorchDEQ worker:

- `cell`: builds cell `name` of `benchmarks/cells.py` with the weights,
  input x, test state z and loss weights R in the `.npz` at `arrays`;
  writes f(z, x), the `iters`-step fixed-point iterate and the unrolled
  step's parameter gradient to an `.npz` beside it, for the parent to
  compare with TensorFlow's;
- `time`: times one row (`what`, `solver`, `mode`, `iters`), compiled with
  `jax.jit`, `warmup` untimed calls then `repeats` timed ones; returns the
  seconds and the forward NFE;
- `versions`: JAX's and Keras' versions and the device.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"


import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from benchmarks import cells  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks import worker_loop  # noqa: E402
from benchmarks.jax_steps import TrainStep  # noqa: E402
from benchmarks.jax_steps import inference  # noqa: E402


class Worker:
    def __init__(self):
        self.cell = None

    def cell_op(self, name, arrays, iters):
        data = np.load(arrays)
        x = data["x"]
        self.cell, _ = cells.make(name, x.shape[0])
        for key, variable in zip(
            cells.weight_names(self.cell, self.cell.weights),
            self.cell.weights,
            strict=True,
        ):
            variable.assign(data[f"w:{key}"])
        self.x = ops.convert_to_tensor(x)
        self.r = ops.convert_to_tensor(data["r"])
        z = ops.convert_to_tensor(data["z"])
        iterate = ops.zeros_like(self.x)
        for _ in range(iters):
            iterate = self.cell(iterate, self.x)
        layer = cells.make_layer(
            self.cell, self.x, "unrolled", "fixed_point", iters
        )
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        grads = jax.grad(
            lambda t: self._loss(
                layer.stateless_call(t, non_trainable, self.x, training=True)[0]
            )
        )(trainable)
        out = arrays[: -len(".npz")] + "_jax.npz"
        np.savez(
            out,
            f=np.asarray(self.cell(z, self.x)),
            fixed_point=np.asarray(iterate),
            **{
                f"g:{k}": np.asarray(g)
                for k, g in zip(
                    cells.weight_names(self.cell, layer.trainable_variables),
                    grads,
                    strict=True,
                )
            },
        )
        return {"path": out}

    def _loss(self, z):
        return ops.mean(z * self.r)

    def _call(self, what, solver, mode, iters):
        """The call to time and its forward NFE."""
        cell, x = self.cell, self.x
        if what == "f":
            z = keras.random.normal(x.shape, seed=5)
            t = [v.value for v in cell.trainable_variables]
            n = [v.value for v in cell.non_trainable_variables]
            f = jax.jit(lambda t, n, z, x: cell.stateless_call(t, n, z, x)[0])
            return lambda: jax.block_until_ready(f(t, n, z, x)), 1
        if what == "solve":
            layer = cells.make_layer(cell, x, "implicit", solver, iters)
            layer(x)  # eager: records the NFE
            nfe = float(layer.forward_nfe.result())
            run = inference(layer)
            return lambda: run(x), nfe
        layer = cells.make_layer(cell, x, mode, solver, iters)
        return TrainStep(layer, x, self._loss), iters

    def time_op(self, what, solver, mode, iters, warmup, repeats):
        call, nfe = self._call(what, solver, mode, iters)
        return {"seconds": timing.seconds(call, repeats, warmup), "nfe": nfe}


def versions():
    return {
        "jax": jax.__version__,
        "keras": keras.__version__,
        "device": str(jax.devices()[0]),
    }


def main():
    worker = Worker()
    worker_loop.serve(
        {"cell": worker.cell_op, "time": worker.time_op, "versions": versions}
    )


if __name__ == "__main__":
    main()
