"""The multiscale DEQ's block: residual blocks per resolution, then fusion."""

from collections.abc import Sequence

import keras

from keras_deq.layers.group_norm import GroupNorm
from keras_deq.layers.spectral_norm import apply_spectral_norm
from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization
from keras_deq.utils import validation


def _check_widths(widths, num_groups):
    widths = tuple(widths)
    if not widths or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths
    ):
        raise ValueError(
            "`widths` must be a non-empty sequence of positive integers, one "
            f"per resolution. Received: widths={widths!r}"
        )
    bad = [w for w in widths if w % num_groups]
    if bad:
        raise ValueError(
            f"Every width must be divisible by `num_groups`={num_groups} "
            f"(GroupNormalization). Received: widths={widths}"
        )
    return widths


@keras.saving.register_keras_serializable(package="keras_deq")
class MDEQBlock(keras.layers.Layer):
    """f_θ of an MDEQ: residual blocks per resolution, then multiscale fusion.

    The state z and the injection x are lists with one `[B, H_i, W_i, C_i]`
    tensor per resolution (each half the height and width of the previous).
    Branch i computes, as the original MDEQ's residual block does,

        h_i = GN₂(conv₂(drop(ReLU(GN₁(conv₁(z_i))))) + x_i)
        y_i = GN₃(ReLU(z_i + h_i))

    (conv₁ widens to `expansion` · C_i, conv₂ narrows back; with
    `branch_norm=False`, y_i = ReLU(z_i + h_i)), and the fusion returns
    out_i = GN(ReLU(y_i + Σ_{j≠i} T_ij(y_j))), where T_ij for a finer j is a
    chain of strided 3×3 convolutions, each followed by GroupNorm, and for a
    coarser j a 1×1 convolution and GroupNorm followed by nearest-neighbour
    upsampling. All convolutions are weight-normalised (when
    `weight_norm`), have no bias, and start from N(0, `init_stddev`²)
    weights (Appendix A.4 of Bai et al., 2021). `drop` is a
    `VariationalDropout`, fixed for a whole solve.

    Stability at initialisation: with the injection added before GN₂ and
    small conv weights, h_i is nearly GN₂(x_i), independent of z; and the
    last GroupNorm of each fusion path starts with scale γ = 0, so the
    fusion starts as the identity and learns its cross-resolution terms.
    Together these make f_θ a contraction at the paper's initialisation,
    N(0, 0.01²) (power-method ρ(J) below 1 on random images, above 1
    with the injection after GN₂ and unit-scale fusion), so the first
    solves converge. At the default N(0, 0.05²) ρ(J) starts near 1:
    `MDEQClassifier`'s defaults train it into a contraction (the Jacobian
    penalty and the fixed-point correction).

    Args:
        widths: channels per resolution, finest first.
        expansion: width factor inside the residual blocks. Defaults to 2
            (the paper's is 5; see `MDEQClassifier`).
        num_groups: GroupNormalization groups. Defaults to 4.
        dropout: variational dropout rate. Defaults to 0 (the paper's is
            0.25).
        weight_norm: wrap every convolution in `WeightNormalization`.
            Defaults to `True`.
        init_stddev: standard deviation of the initial conv weights.
            Defaults to 0.05 (the paper's is 0.01).
        branch_norm: normalize each branch's output (GN₃), as the paper
            does. `False` drops GN₃, so that each resolution's state is
            normalized once, after the fusion. Defaults to `True`.
        spectral_norm: `None`, or a bound > 0 on the spectral norm of
            every convolution's kernel (`keras_deq.layers.SpectralNormBound`
            as the kernels' constraint, applied at build and after every
            optimizer update). Needs `weight_norm=False`, whose kernels are
            computed rather than stored. Defaults to `None`.
        seed: int seed of the initialisers and dropout. Defaults to `None`.

    Examples:

        ```python
        block = keras_deq.models.MDEQBlock(widths=(16, 32, 64, 128))
        deq = keras_deq.DEQLayer(block, max_iter=7)
        z_star = deq(injections)  # a list of 4 resolutions, finest first
        ```
    """

    def __init__(
        self,
        widths: Sequence[int] = (28, 56, 112, 224),
        expansion: int = 2,
        num_groups: int = 4,
        dropout: float = 0.0,
        weight_norm: bool = True,
        init_stddev: float = 0.05,
        branch_norm: bool = True,
        spectral_norm: float | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.branch_norm = validation.check_bool("branch_norm", branch_norm)
        if spectral_norm is not None:
            spectral_norm = validation.check_positive(
                "spectral_norm", spectral_norm
            )
            if weight_norm:
                raise ValueError(
                    "`spectral_norm` bounds stored kernels and needs "
                    "`weight_norm=False`. Received: "
                    f"spectral_norm={spectral_norm}, weight_norm={weight_norm}"
                )
        self.spectral_norm = spectral_norm
        self.num_groups = validation.check_int("num_groups", num_groups, 1)
        self.widths = _check_widths(widths, num_groups)
        self.expansion = validation.check_int("expansion", expansion, 1)
        self.dropout = validation.check_range("dropout", dropout, 0, 1)
        self.weight_norm = bool(weight_norm)
        self.init_stddev = validation.check_positive("init_stddev", init_stddev)
        self.seed = seed
        self._seed_counter = 0

    def _initializer(self):
        self._seed_counter += 1
        seed = (
            None if self.seed is None else self.seed * 1000 + self._seed_counter
        )
        return keras.initializers.RandomNormal(
            stddev=self.init_stddev, seed=seed
        )

    def _conv(self, filters, kernel_size, strides=1, name=None):
        conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer=self._initializer(),
            dtype=self.dtype_policy,
            name=name,
        )
        if self.weight_norm:
            return WeightNormalization(conv, dtype=self.dtype_policy, name=name)
        return conv

    def _norm(self, name=None, gamma="ones"):
        return GroupNorm(
            self.num_groups,
            epsilon=1e-5,
            gamma_initializer=gamma,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, z_shape, x_shape):
        if len(z_shape) != len(self.widths):
            raise ValueError(
                f"MDEQBlock has {len(self.widths)} resolutions, but the state "
                f"has {len(z_shape)} tensors."
            )
        self.branches = []
        for i, (shape, width) in enumerate(
            zip(z_shape, self.widths, strict=True)
        ):
            if shape[-1] != width:
                raise ValueError(
                    f"State tensor {i} has {shape[-1]} channels; widths[{i}] "
                    f"is {width}."
                )
            inner = width * self.expansion
            branch = [
                self._conv(inner, 3, name=f"b{i}_conv1"),
                self._norm(f"b{i}_gn1"),
                VariationalDropout(
                    self.dropout,
                    seed=None if self.seed is None else self.seed + i,
                    dtype=self.dtype_policy,
                    name=f"b{i}_drop",
                ),
                self._conv(width, 3, name=f"b{i}_conv2"),
                self._norm(f"b{i}_gn2"),
                self._norm(f"b{i}_gn3") if self.branch_norm else None,
            ]
            inner_shape = tuple(shape[:-1]) + (inner,)
            for layer, in_shape in zip(
                branch,
                [shape, inner_shape, inner_shape, inner_shape, shape, shape],
                strict=True,
            ):
                if layer is not None:
                    layer.build(in_shape)
            self.branches.append(branch)

        self.fuse = [
            [
                self._fuse_path(i, j, shape_j)
                for j, shape_j in enumerate(z_shape)
            ]
            for i in range(len(z_shape))
        ]
        self.post_norms = [
            self._norm(f"post_gn{i}") for i in range(len(z_shape))
        ]
        for norm, shape in zip(self.post_norms, z_shape, strict=True):
            norm.build(shape)
        self.built = True
        if self.spectral_norm is not None:
            # Made anew at every build, so a loaded block keeps the bound.
            apply_spectral_norm(self, self.spectral_norm)

    def _fuse_path(self, i, j, shape_j):
        """T_ij: from resolution j to resolution i, as a list of layers."""
        if i == j:
            return []
        layers = []
        if j < i:  # finer to coarser: strided 3×3 convolutions
            for step in range(i - j):
                last = step == i - j - 1
                width = self.widths[i] if last else self.widths[j]
                layers.append(
                    self._conv(width, 3, strides=2, name=f"f{j}to{i}_c{step}")
                )
                layers.append(
                    self._norm(
                        f"f{j}to{i}_gn{step}", "zeros" if last else "ones"
                    )
                )
                if not last:
                    layers.append(keras.layers.ReLU(dtype=self.dtype_policy))
        else:  # coarser to finer: 1×1 convolution, then upsampling
            layers.append(self._conv(self.widths[i], 1, name=f"f{j}to{i}_c"))
            layers.append(self._norm(f"f{j}to{i}_gn", "zeros"))
            layers.append(
                keras.layers.UpSampling2D(2 ** (j - i), dtype=self.dtype_policy)
            )
        shape = tuple(shape_j)
        for layer in layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        return layers

    def call(self, z, x, training=None):
        ys = []
        for z_i, x_i, branch in zip(z, x, self.branches, strict=True):
            conv1, gn1, drop, conv2, gn2, gn3 = branch
            h = keras.ops.relu(gn1(conv1(z_i)))
            h = drop(h, training=training)
            h = gn2(conv2(h) + x_i)
            y = keras.ops.relu(z_i + h)
            ys.append(y if gn3 is None else gn3(y))
        out = []
        for i, paths in enumerate(self.fuse):
            total = ys[i]
            for j, path in enumerate(paths):
                if i == j:
                    continue
                y = ys[j]
                for layer in path:
                    y = layer(y)
                total = total + y
            out.append(self.post_norms[i](keras.ops.relu(total)))
        return out

    def get_config(self):
        return {
            **super().get_config(),
            "widths": list(self.widths),
            "expansion": self.expansion,
            "num_groups": self.num_groups,
            "dropout": self.dropout,
            "weight_norm": self.weight_norm,
            "init_stddev": self.init_stddev,
            "branch_norm": self.branch_norm,
            "spectral_norm": self.spectral_norm,
            "seed": self.seed,
        }
