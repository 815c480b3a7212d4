"""Multiscale deep equilibrium model (MDEQ) for image classification."""

from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_deq.layers.variational_dropout import VariationalDropout
from keras_deq.layers.weight_normalization import WeightNormalization
from keras_deq.models import _deq_options
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


class GroupNorm(keras.layers.GroupNormalization):
    """Keras' `GroupNormalization`, computed as fewer passes TF runs fast.

    The same arithmetic (per sample and group: the mean, then the mean of
    squared deviations, both over positions and the group's channels), with
    the same weights and configuration. For channels-last inputs it sums
    over the positions first (`[B, H·W, C]` → `[B, C]`, a contiguous
    reduction) and over each group's channels second, where Keras reduces a
    `[B, H, W, G, C/G]` tensor over three axes at once; the deviations are
    squared in one op (`squared_difference`), and the output is one affine
    map per sample and channel, x·a + b, so no centred copy of the input is
    kept (the timings against Keras' layer are in `docs/benchmarks.md`).
    Other axes fall back to Keras' computation.
    """

    def call(self, inputs):
        rank = len(inputs.shape)
        if self.axis not in (-1, rank - 1) or rank < 3:
            return super().call(inputs)
        compute = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, compute)
        shape = tf.shape(x)
        channels, groups = x.shape[-1], self.groups
        per_group = channels // groups
        flat = tf.reshape(x, [shape[0], -1, channels])
        count = tf.cast(tf.shape(flat)[1] * per_group, compute)

        def group_mean(channel_sums):
            """[B, C] sums → [B, C], each channel its group's mean."""
            sums = tf.reshape(channel_sums, [-1, groups, per_group])
            mean = tf.reduce_sum(sums, axis=-1, keepdims=True) / count
            mean = tf.broadcast_to(mean, tf.shape(sums))
            return tf.reshape(mean, [-1, channels])

        mean = group_mean(tf.reduce_sum(flat, axis=1))
        deviations = tf.math.squared_difference(flat, mean[:, None])
        variance = group_mean(tf.reduce_sum(deviations, axis=1))
        scale = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * tf.cast(self.gamma, compute)
        shift = -mean * scale
        if self.center:
            shift = shift + tf.cast(self.beta, compute)
        outputs = flat * scale[:, None] + shift[:, None]
        return tf.cast(tf.reshape(outputs, shape), self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_deq")
class MDEQBlock(keras.layers.Layer):
    """f_θ of an MDEQ: residual blocks per resolution, then multiscale fusion.

    The state z and the injection x are lists with one `[B, H_i, W_i, C_i]`
    tensor per resolution (each half the height and width of the previous).
    Branch i computes, as the original MDEQ's residual block does,

        h_i = GN₂(conv₂(drop(ReLU(GN₁(conv₁(z_i))))) + x_i)
        y_i = GN₃(ReLU(z_i + h_i))

    (conv₁ widens to `expansion` · C_i, conv₂ narrows back), and the fusion
    returns out_i = GN(ReLU(y_i + Σ_{j≠i} T_ij(y_j))), where T_ij for a
    finer j is a chain of strided 3×3 convolutions, each followed by
    GroupNorm, and for a coarser j a 1×1 convolution and GroupNorm followed
    by nearest-neighbour upsampling. All convolutions are weight-normalised
    (when `weight_norm`), have no bias, and start from N(0, `init_stddev`²)
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
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
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
                self._norm(f"b{i}_gn3"),
            ]
            inner_shape = tuple(shape[:-1]) + (inner,)
            for layer, in_shape in zip(
                branch,
                [shape, inner_shape, inner_shape, inner_shape, shape, shape],
                strict=True,
            ):
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
            h = tf.nn.relu(gn1(conv1(z_i)))
            h = drop(h, training=training)
            h = gn2(conv2(h) + x_i)
            ys.append(gn3(tf.nn.relu(z_i + h)))
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
            out.append(self.post_norms[i](tf.nn.relu(total)))
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
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_deq")
class MDEQClassifier(_deq_options.ConfigMixin, keras.Model):
    """A multiscale DEQ image classifier (Bai et al. 2020; 2021).

    A stem (3×3 conv, GroupNorm, ReLU) makes the finest injection x₀; each
    coarser injection x_i is a strided 3×3 conv (+ GroupNorm) of x_{i−1},
    so the input enters every resolution. One `DEQLayer` solves for the
    four-resolution state z* = f_θ(z*, x) of an `MDEQBlock`; the head
    averages each resolution of z* over space, concatenates them and maps
    them to logits with one Dense layer.

    The defaults aim at an equilibrium model: an output that is the fixed
    point, reached from any first iterate, so that a larger test-time
    budget (`model.override_inference(max_iter=...)`) keeps its answers.
    Check a trained model with `keras_deq.diagnostics.equilibrium_report`.
    They follow Table 4 (CIFAR-10) of Bai, Koltun & Kolter (2021) --
    widths (28, 56, 112, 224), GroupNorm, weight normalization, Broyden
    with 7 forward NFEs and tolerance 1e-3, M = 1 -- with these departures
    (the paper's values in `PAPER_CIFAR10`):

    - the phantom gradient (one step from z*; the paper's is implicit),
      which needs no backward solve and keeps training memory constant in
      `max_iter`;
    - the Jacobian penalty on every step, γ = 1, p = 1 (γ 0.5, p 0.05);
    - the fixed-point correction loss, λ = 1 over the first 3 iterates
      (`correction_weight`; none in the paper);
    - training solves start from N(0, 1) noise around the zero first
      iterate (`random_start=1.0`; Anil et al., NeurIPS 2022);
    - residual blocks expanded 2× (5×), no variational dropout (0.25),
      conv weights from N(0, 0.05²) (N(0, 0.01²)).

    The docs' Models page says why, with the measurements. The paper's
    model is `MDEQClassifier(num_classes, **MDEQClassifier.PAPER_CIFAR10)`;
    `examples/cifar10_mdeq.py` builds it.

    Every other `DEQLayer` argument is a keyword argument of the model too
    (`MDEQClassifier(10, max_iter=12, solver="anderson",
    solver_options={"m": 5})`), applied over `DEQ_DEFAULTS`; `get_config`
    saves them with their current values (γ and p as callbacks left them).
    The model is functional (`model.deq` is the DEQLayer), so `.keras`
    files, `model.export` and the `keras_deq.callbacks` work on it.

    Args:
        num_classes: number of classes.
        input_shape: image shape `(H, W, C)`. Defaults to `(32, 32, 3)`.
        widths: channels per resolution, finest first. Defaults to
            `(28, 56, 112, 224)`.
        expansion: width factor inside the `MDEQBlock`'s residual blocks.
            Defaults to 2.
        num_groups: GroupNorm groups. Defaults to 4.
        dropout: variational dropout rate in the block. Defaults to 0.
        weight_norm: wrap the block's convolutions in
            `WeightNormalization`. Defaults to `True`.
        init_stddev: standard deviation of the initial conv weights.
            Defaults to 0.05.
        seed: int seed of initialisers, dropout and the `DEQLayer`'s
            random draws. Defaults to `None`.
        deq_name: name of the model's `DEQLayer`, which prefixes its
            statistics (`{deq_name}_forward_nfe`, ...). Defaults to `None`:
            `"deq"`, or `"deq_1"`, `"deq_2"`, ... for later models in the
            process, so that two models trained together (an ensemble, a
            teacher and a student) log both layers' statistics.
        **kwargs: any `DEQLayer` argument but `seed` (`solver`, `max_iter`,
            `tol`, `gradient`, `jac_weight`, ...; see `DEQ_DEFAULTS`), and
            `keras.Model` arguments (`name`, `dtype`, `trainable`).

    Examples:

        ```python
        model = keras_deq.models.MDEQClassifier(
            10, input_shape=(32, 32, 3), widths=(16, 32, 64, 128), seed=0
        )
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(images, labels, batch_size=64, epochs=8)
        model.override_inference(max_iter=28)  # 4× the trained budget
        model.evaluate(test_images, test_labels)
        ```
    """

    # The paper's values where the defaults depart (Table 4, CIFAR-10).
    PAPER_CIFAR10 = {
        "expansion": 5,
        "dropout": 0.25,
        "init_stddev": 0.01,
        "gradient": "implicit",
        "jac_weight": 0.5,
        "jac_freq": 0.05,
        "correction_weight": 0.0,
        "random_start": None,
    }

    DEQ_DEFAULTS = {
        "solver": "broyden",
        "max_iter": 7,
        "tol": 1e-3,
        "backward_max_iter": 8,
        "backward_tol": 1e-4,
        "gradient": "phantom",
        "jac_weight": 1.0,
        "jac_freq": 1.0,
        "jac_samples": 1,
        "correction_weight": 1.0,
        "random_start": 1.0,
    }

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int] = (32, 32, 3),
        widths: Sequence[int] = (28, 56, 112, 224),
        expansion: int = 2,
        num_groups: int = 4,
        dropout: float = 0.0,
        weight_norm: bool = True,
        init_stddev: float = 0.05,
        seed: int | None = None,
        deq_name: str | None = None,
        **kwargs,
    ):
        deq_options = _deq_options.take(self.DEQ_DEFAULTS, kwargs)
        validation.check_int("num_classes", num_classes, 2)
        widths = _check_widths(widths, num_groups)
        input_shape = tuple(input_shape)
        scale = 2 ** (len(widths) - 1)
        if len(input_shape) != 3 or any(
            s is None or s % scale for s in input_shape[:2]
        ):
            raise ValueError(
                "`input_shape` must be (height, width, channels) with height "
                f"and width divisible by {scale} ({len(widths)} resolutions). "
                f"Received: input_shape={input_shape}"
            )
        dtype = _deq_options.dtype_policy(kwargs.pop("dtype", None))
        _deq_options.check_base("MDEQClassifier", kwargs)

        def norm(name):
            return GroupNorm(num_groups, epsilon=1e-5, dtype=dtype, name=name)

        def glorot(index):
            # Keras' default kernel initialiser, seeded apart from the
            # block's (which uses seed · 1000 + 1, 2, ...).
            return keras.initializers.GlorotUniform(
                None if seed is None else seed * 1000 + 900 + index
            )

        images = keras.Input(input_shape, name="images")
        h = keras.layers.Conv2D(
            widths[0],
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=glorot(0),
            dtype=dtype,
            name="stem_conv",
        )(images)
        h = keras.layers.ReLU(dtype=dtype)(norm("stem_gn")(h))
        injections = [h]
        for i, width in enumerate(widths[1:], start=1):
            h = keras.layers.Conv2D(
                width,
                3,
                strides=2,
                padding="same",
                use_bias=False,
                kernel_initializer=glorot(i),
                dtype=dtype,
                name=f"inject{i}_conv",
            )(h)
            h = norm(f"inject{i}_gn")(h)
            injections.append(h)
        block = MDEQBlock(
            widths,
            expansion=expansion,
            num_groups=num_groups,
            dropout=dropout,
            weight_norm=weight_norm,
            init_stddev=init_stddev,
            seed=seed,
            dtype=dtype,
            name="mdeq_block",
        )
        deq = _deq_options.deq_layer(block, seed, dtype, deq_name, deq_options)
        states = deq(injections)
        pooled = [
            keras.layers.GlobalAveragePooling2D(dtype=dtype, name=f"pool{i}")(s)
            for i, s in enumerate(states)
        ]
        features = keras.layers.Concatenate(dtype=dtype, name="features")(
            pooled
        )
        logits = keras.layers.Dense(
            num_classes,
            kernel_initializer=glorot(len(widths)),
            dtype="float32",
            name="logits",
        )(features)
        super().__init__(images, logits, **kwargs)
        self._deq_name = deq.name
        if dtype is not None:  # Functional drops it, as keras-hub notes
            self.dtype_policy = dtype
        self._config = {
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "widths": list(widths),
            "expansion": expansion,
            "num_groups": num_groups,
            "dropout": dropout,
            "weight_norm": weight_norm,
            "init_stddev": init_stddev,
            "seed": seed,
        }
