"""TorchDEQ's side of `benchmarks/compare_torchdeq.py`, run in its own
interpreter (one that has `torch` and `torchdeq`; this file imports neither
TensorFlow nor keras_deq).

It reads one JSON request per line on standard input and answers each with
one JSON line on standard output:

- `{"op": "cell", "name": ..., "arrays": PATH, "device": "cpu"}`: builds
  the cell of `benchmarks/cells.py` named `name` from the Keras weights,
  input `x`, test state `z` and loss weights `r` in the `.npz` at PATH
  (Keras layouts), and writes f(z, x), the `iters`-step fixed-point iterate
  and the parameter gradient of an unrolled step, in Keras layouts, to
  PATH + ".torch.npz"; then moves the cell and its tensors to `device`
  (`"cuda"` on a GPU) for the timings.
- `{"op": "time", "what": "f" | "solve" | "step", "solver": ...,
  "mode": "implicit" | "phantom" | "unrolled", "iters": T, "warmup": W,
  "repeats": N}`: times N calls after W untimed ones and answers the
  seconds of each, the forward NFE and, on a GPU, the peak memory
  allocated during them in MB (`peak_mb`, else `None`).
- `{"op": "versions"}`.

Training steps are those of `benchmarks/steps.py`: loss mean(z* ⊙ r), the
forward at exactly T evaluations, T backward iterations, SGD.
"""

import importlib.metadata
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchdeq
import worker_loop  # beside this file, which runs as a script
from torch import nn


def _param(array):
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array)))


class MLPCell(nn.Module):
    # Keras: tanh(z Wᵀ + x Uᵀ + b).
    LAYOUT = {"w": "w", "u": "u", "b": "b"}

    def __init__(self, weights):
        super().__init__()
        self.w, self.u, self.b = (_param(weights[k]) for k in ("w", "u", "b"))

    def forward(self, z, x):
        return torch.tanh(F.linear(z, self.w) + F.linear(x, self.u) + self.b)


def _conv_to_torch(kernel):  # Keras (kh, kw, in, out) → torch (out, in, kh, kw)
    return kernel.transpose(3, 2, 0, 1)


class ConvCell(nn.Module):
    """NCHW; the worker converts from and to Keras' NHWC."""

    def __init__(self, weights):
        super().__init__()
        self.conv1, self.conv2 = (
            nn.Conv2d(64, 64, 3, padding=1, bias=False) for _ in range(2)
        )
        self.gn1, self.gn2, self.gn3 = (
            nn.GroupNorm(8, 64, eps=1e-5) for _ in range(3)
        )
        with torch.no_grad():
            for i in (1, 2):
                getattr(self, f"conv{i}").weight.copy_(
                    torch.from_numpy(_conv_to_torch(weights[f"conv{i}/kernel"]))
                )
            for i in (1, 2, 3):
                norm = getattr(self, f"gn{i}")
                norm.weight.copy_(torch.from_numpy(weights[f"gn{i}/gamma"]))
                norm.bias.copy_(torch.from_numpy(weights[f"gn{i}/beta"]))

    def forward(self, z, x):
        h = F.relu(self.gn1(self.conv1(z)))
        h = self.gn2(self.conv2(h))
        return self.gn3(F.relu(z + h + x))

    def keras_gradients(self):
        grads = {}
        for i in (1, 2):
            g = getattr(self, f"conv{i}").weight.grad.numpy()
            grads[f"conv{i}/kernel"] = g.transpose(2, 3, 1, 0)
        for i in (1, 2, 3):
            norm = getattr(self, f"gn{i}")
            grads[f"gn{i}/gamma"] = norm.weight.grad.numpy()
            grads[f"gn{i}/beta"] = norm.bias.grad.numpy()
        return grads


class TransformerCell(nn.Module):
    """Post-LN: u = z + x, h = LN₁(u + MHA(u)), f = LN₂(h + FFN(h)); the
    attention as a PyTorch user writes it (Linear projections and
    `scaled_dot_product_attention`), with Keras' MultiHeadAttention
    weights."""

    heads, key_dim, width = 4, 64, 256

    def __init__(self, weights):
        super().__init__()
        d = self.width
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ffn1, self.ffn2 = nn.Linear(d, 1024), nn.Linear(1024, d)
        self.ln1, self.ln2 = (nn.LayerNorm(d, eps=1e-5) for _ in range(2))
        with torch.no_grad():
            for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
                layer = getattr(self, name)
                kernel = weights[f"attention/{key}/kernel"].reshape(d, d)
                layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
                layer.bias.copy_(
                    torch.from_numpy(weights[f"attention/{key}/bias"].ravel())
                )
            out = weights["attention/attention_output/kernel"].reshape(d, d)
            self.o.weight.copy_(torch.from_numpy(out.T.copy()))
            self.o.bias.copy_(
                torch.from_numpy(weights["attention/attention_output/bias"])
            )
            for name in ("ffn1", "ffn2"):
                layer = getattr(self, name)
                layer.weight.copy_(
                    torch.from_numpy(weights[f"{name}/kernel"].T.copy())
                )
                layer.bias.copy_(torch.from_numpy(weights[f"{name}/bias"]))
            for name in ("ln1", "ln2"):
                layer = getattr(self, name)
                layer.weight.copy_(torch.from_numpy(weights[f"{name}/gamma"]))
                layer.bias.copy_(torch.from_numpy(weights[f"{name}/beta"]))

    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.key_dim).transpose(1, 2)

    def forward(self, z, x):
        u = z + x
        b, n, d = u.shape
        attended = F.scaled_dot_product_attention(
            self._heads(self.q(u)),
            self._heads(self.k(u)),
            self._heads(self.v(u)),
        )
        h = self.ln1(u + self.o(attended.transpose(1, 2).reshape(b, n, d)))
        return self.ln2(h + self.ffn2(F.relu(self.ffn1(h))))

    def keras_gradients(self):
        d, heads, key_dim = self.width, self.heads, self.key_dim
        grads = {}
        for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
            layer = getattr(self, name)
            grads[f"attention/{key}/kernel"] = (
                layer.weight.grad.numpy().T.reshape(d, heads, key_dim)
            )
            grads[f"attention/{key}/bias"] = layer.bias.grad.numpy().reshape(
                heads, key_dim
            )
        grads["attention/attention_output/kernel"] = (
            self.o.weight.grad.numpy().T.reshape(heads, key_dim, d)
        )
        grads["attention/attention_output/bias"] = self.o.bias.grad.numpy()
        for name in ("ffn1", "ffn2"):
            layer = getattr(self, name)
            grads[f"{name}/kernel"] = layer.weight.grad.numpy().T
            grads[f"{name}/bias"] = layer.bias.grad.numpy()
        for name in ("ln1", "ln2"):
            layer = getattr(self, name)
            grads[f"{name}/gamma"] = layer.weight.grad.numpy()
            grads[f"{name}/beta"] = layer.bias.grad.numpy()
        return grads


def _mlp_gradients(cell):
    return {k: getattr(cell, k).grad.numpy() for k in ("w", "u", "b")}


MLPCell.keras_gradients = _mlp_gradients
CELLS = {"mlp": MLPCell, "conv": ConvCell, "transformer": TransformerCell}


class Worker:
    def __init__(self):
        self.cell = self.x = self.r = None
        self.nchw = False
        self.device = torch.device("cpu")

    def _to_torch(self, array):
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return t.permute(0, 3, 1, 2).contiguous() if self.nchw else t

    def _to_keras(self, tensor):
        tensor = tensor.detach()
        if self.nchw:
            tensor = tensor.permute(0, 2, 3, 1)
        return tensor.contiguous().numpy()

    def cell_op(self, name, arrays, iters, device="cpu"):
        data = np.load(arrays)
        weights = {
            k[len("w:") :]: data[k] for k in data.files if k.startswith("w:")
        }
        self.nchw = name == "conv"
        self.cell = CELLS[name](weights)
        self.x, self.r = self._to_torch(data["x"]), self._to_torch(data["r"])
        z = self._to_torch(data["z"])
        with torch.no_grad():
            f_z = self.cell(z, self.x)
            iterate = torch.zeros_like(self.x)
            for _ in range(iters):
                iterate = self.cell(iterate, self.x)
        self.cell.zero_grad()
        self._unrolled_loss(iters).backward()
        grads = self.cell.keras_gradients()
        np.savez(
            arrays + ".torch.npz",
            f=self._to_keras(f_z),
            fixed_point=self._to_keras(iterate),
            **{f"g:{k}": v for k, v in grads.items()},
        )
        self.device = torch.device(device)
        self.cell.to(self.device)
        self.x, self.r = self.x.to(self.device), self.r.to(self.device)
        return {"path": arrays + ".torch.npz"}

    def _unrolled_loss(self, iters):
        z = torch.zeros_like(self.x)
        for _ in range(iters):
            z = self.cell(z, self.x)
        return (z * self.r).mean()

    def _deq(self, solver, mode, iters):
        return torchdeq.get_deq(
            f_solver=solver,
            b_solver=solver,
            f_max_iter=iters,
            b_max_iter=iters,
            f_tol=1e-30,
            b_tol=1e-30,
            ift=mode == "implicit",
            grad=1,
        )

    def _function(self, what, solver, mode, iters):
        """The call to time, and a call that returns its forward NFE."""
        cell, x = self.cell, self.x
        z0 = torch.zeros_like(x)
        if what == "f":
            z = torch.randn_like(x)

            def call():
                with torch.no_grad():
                    return cell(z, x)

            return call, lambda: 1
        if what == "solve":
            deq = self._deq(solver, "implicit", iters).eval()

            def call():
                with torch.no_grad():
                    return deq(lambda z: cell(z, x), z0)

            return call, lambda: float(call()[1]["nstep"].float().mean())
        optimizer = torch.optim.SGD(cell.parameters(), lr=1e-6)
        if mode == "unrolled":

            def loss():
                return self._unrolled_loss(iters), iters

        else:
            deq = self._deq(solver, mode, iters).train()

            def loss():
                z_out, info = deq(lambda z: cell(z, x), z0)
                nfe = info["nstep"].float().mean()
                return (z_out[-1] * self.r).mean(), nfe

        def step():
            optimizer.zero_grad()
            value, nfe = loss()
            value.backward()
            optimizer.step()
            return nfe

        return step, lambda: float(step())

    def time_op(self, what, solver, mode, iters, warmup, repeats):
        call, count = self._function(what, solver, mode, iters)
        gpu = self.device.type == "cuda"
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        nfe = count()
        for _ in range(warmup):
            call()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            if gpu:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
        return {"seconds": seconds, "nfe": nfe, "peak_mb": peak}


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchdeq": importlib.metadata.version("torchdeq"),
        "threads": torch.get_num_threads(),
        "gpu": (
            torch.cuda.get_device_name() if torch.cuda.is_available() else None
        ),
    }


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    worker = Worker()
    worker_loop.serve(
        {"cell": worker.cell_op, "time": worker.time_op, "versions": versions}
    )


if __name__ == "__main__":
    main()
