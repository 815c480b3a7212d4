"""Cached decoding for the DEQ-Transformer: one position's solve a token."""

import keras
import numpy as np
from keras import ops

from keras_deq import backend as _backend
from keras_deq.utils import validation

# generate's memory grows in blocks of this many positions.
_MEMORY_BLOCK = 64


class CachedDecoding:
    """`decode_step`, `generate` and an `export` with `decode_step`.

    Mixed into `DEQTransformerLM`: the equilibrium of a solved position
    never changes (f is causal and every position is its own problem), so
    the attention keys and values of solved positions are kept as `memory`
    and each new token costs one position's solve against them.
    """

    def _memory_spec(self):
        """`(shape, dtype, name)` of a memory."""
        dtype = self.deq.block.compute_dtype
        return (None, None, 2 * self.hidden_dim), dtype, "memory"

    def _solve_new(self, token_ids, memory, memory_length=None):
        """Logits `[B, S, vocab]` of new positions and their memory."""
        deq = self.deq
        block = deq.block
        if memory_length is None:
            start = ops.shape(memory)[1]
        else:
            start = memory_length
        h = self.get_layer("token_embedding")(token_ids)
        h = self.get_layer("embedding_scale")(h)
        positions = self.get_layer("positions")(h, start_index=start)
        h = self.get_layer("embedded")([h, positions])
        x = self.get_layer("injection")(h)

        def f(z):
            return block(
                z,
                x,
                training=False,
                memory=memory,
                memory_length=memory_length,
            )

        z_star, _ = deq.solve(f, block.initial_state(x))
        logits = self.get_layer("token_embedding")(z_star, reverse=True)
        return ops.cast(logits, "float32"), block.attention_memory(z_star, x)

    def _decode_step(self, token_ids, memory):
        """`decode_step` in graph form: both arguments given, no checks."""
        logits, new = self._solve_new(token_ids, memory)
        return logits, ops.concatenate([memory, ops.cast(new, memory.dtype)], 1)

    def _decode_into(self, token_ids, memory, memory_length):
        """One new token per row into a preallocated memory (generate's).

        `memory` `[B, C, 2 · hidden_dim]` holds `memory_length` filled
        positions; the new one's keys and values go to the next slot.
        Shapes do not change from token to token, so this compiles once
        (XLA) per batch size and capacity C.
        """
        logits, new = self._solve_new(token_ids, memory, memory_length)
        slot = ops.arange(ops.shape(memory)[1])[None, :, None] == memory_length
        memory = ops.where(slot, ops.cast(new, memory.dtype), memory)
        return logits[:, -1], memory

    def _decode_function(self):
        if self._decode is None:
            self._decode = _backend.function(
                self._decode_step,
                [((None, None), "int32", "token_ids"), self._memory_spec()],
                state=self,
            )
        return self._decode

    def empty_memory(self, batch_size: int):
        """The memory of no positions, `[batch_size, 0, 2 · hidden_dim]`."""
        validation.check_int("batch_size", batch_size, 1)
        (_, _, width), dtype, _ = self._memory_spec()
        return ops.zeros((batch_size, 0, width), dtype)

    def decode_step(self, token_ids, memory=None):
        """Logits of tokens that continue a remembered prefix, and new memory.

        The DEQ analogue of a key/value cache. With `sample_axes=2` the
        equilibrium at a position depends on the positions before it only,
        so once solved it can be kept: `memory` holds, for every earlier
        position, the attention keys and values of its equilibrium
        (`DEQTransformerBlock.attention_memory`). This solves only the new
        positions, with the `DEQLayer`'s solver settings, attending to the
        remembered ones, so a new token costs one position's solve instead
        of the whole sequence's.

        The result equals the full forward pass (`model(ids)`) up to the
        solver tolerance, not bit for bit: the full pass solves every
        position together, each against the current iterates of the
        earlier ones, while this solves against their equilibria.

        Args:
            token_ids: `[B, S]` ids of positions M, ..., M + S − 1 (a prompt
                when `memory` is empty, then one new token at a time).
            memory: `[B, M, 2 · hidden_dim]` from an earlier call, or `None`
                for none (M = 0).

        Returns:
            `(logits, memory)`: float32 logits `[B, S, vocab_size]` for the
            token after each of the S positions, and the memory of all
            M + S positions.
        """
        ids = ops.convert_to_tensor(token_ids)
        dtype = keras.backend.standardize_dtype(ids.dtype)
        if len(ids.shape) != 2 or "int" not in dtype:
            raise ValueError(
                "`token_ids` must be a [batch, length] integer tensor. "
                f"Received: shape {tuple(ids.shape)}, dtype {dtype}"
            )
        (_, _, width), memory_dtype, _ = self._memory_spec()
        if memory is None:
            memory = self.empty_memory(ids.shape[0])
        memory = ops.convert_to_tensor(memory, memory_dtype)
        if (
            len(memory.shape) != 3
            or memory.shape[-1] != width
            or (memory.shape[0] != ids.shape[0])
        ):
            raise ValueError(
                "`memory` must be [batch, positions, "
                f"{width}] with the batch of `token_ids` "
                f"({ids.shape[0]}). Received shape {tuple(memory.shape)}"
            )
        return self._decode_function()(ops.cast(ids, "int32"), memory)

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """`keras.Model.export`, plus a `decode_step` endpoint.

        The SavedModel has `serve(token_ids)` (`[B, T]` → logits `[B, T,
        vocab]`, the full forward pass) and `decode_step(token_ids,
        memory)`, the incremental decoding of `decode_step` (start it with
        a `[B, 0, 2 · hidden_dim]` memory). Other formats export `serve`
        only, as Keras does, and so does the JAX backend: its SavedModel
        (jax2tf's) takes no empty axis, so no empty first memory.
        """
        if format == "tf_saved_model" and kwargs:
            raise TypeError(
                f"Unexpected export arguments: {sorted(kwargs)}. "
                "DEQTransformerLM.export takes filepath, format, verbose "
                "and input_signature."
            )
        if format != "tf_saved_model" or not _backend.EXPORT_EMPTY_AXES:
            return super().export(
                filepath,
                format=format,
                verbose=verbose,
                input_signature=input_signature,
                **kwargs,
            )
        import tensorflow as tf  # a SavedModel is TensorFlow's

        memory_shape, memory_dtype, memory_name = self._memory_spec()
        archive = keras.export.ExportArchive()
        archive.track_and_add_endpoint(
            "serve",
            self,
            input_signature
            or [tf.TensorSpec([None, None], tf.int32, name="tokens")],
        )
        archive.add_endpoint(
            "decode_step",
            self._decode_step,
            input_signature=[
                tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                tf.TensorSpec(memory_shape, memory_dtype, name=memory_name),
            ],
        )
        archive.write_out(
            filepath, verbose=True if verbose is None else verbose
        )

    def _cached_decoder(self, ids, num_tokens):
        """The prompt's next-token logits, and `decode(new) -> logits`.

        The prompt is solved at once (`decode_step`); every later token
        through `_decode_into`, compiled with XLA, on a memory with room
        for `num_tokens` more positions.
        """
        logits, memory = self._decode_function()(
            ids, self.empty_memory(len(ids))
        )
        # Room for every position that will be decoded, rounded up so that
        # generations of similar lengths share one compilation.
        filled = ids.shape[1]
        capacity = -(-(filled + num_tokens) // _MEMORY_BLOCK) * _MEMORY_BLOCK
        state = {
            "memory": ops.pad(memory, [[0, 0], [0, capacity - filled], [0, 0]]),
            "filled": filled,
        }
        if self._decode_compiled is None:
            self._decode_compiled = _backend.function(
                self._decode_into, jit_compile=True, state=self
            )

        def decode(new):
            if state["filled"] >= capacity:
                raise ValueError(
                    f"This decoder has room for {num_tokens} new tokens."
                )
            logits, state["memory"] = self._decode_compiled(
                new,
                state["memory"],
                ops.convert_to_tensor(state["filled"], "int32"),
            )
            state["filled"] += 1
            return logits

        return logits[:, -1], decode

    def generate(
        self,
        token_ids,
        num_tokens: int,
        sampler="greedy",
        temperature: float = 0.0,
        seed: int | None = None,
        cache: bool = True,
    ) -> np.ndarray:
        """Continues `token_ids` (`[B, T]` or `[T]`) by `num_tokens` tokens.

        Each new token is chosen from the next-token logits by a keras-hub
        sampler (`keras_hub.samplers`): `"greedy"` (the default, argmax),
        `"top_k"`, `"top_p"`, `"random"`, or a `keras_hub.samplers.Sampler`
        instance for other settings (`TopKSampler(k=10, temperature=0.7)`).
        `temperature > 0` with the default sampler draws from
        softmax(logits / temperature) (a `RandomSampler`); `seed` seeds the
        samplers given by name. With `cache=True` (the default) the prompt
        is solved once and each new token costs one position's solve
        against the remembered equilibria (`decode_step`, with the memory
        preallocated and the step compiled with XLA, once per batch size
        and length rounded up to 64); with `cache=False` every token comes
        from a full forward pass over the sequence so far
        (`next_token_logits`). The two agree up to the solver tolerance, so
        a greedy continuation can differ only where two tokens' logits are
        that close.

        Returns:
            The prompt and its continuation, int32, `[B, T + num_tokens]`
            (or `[T + num_tokens]` for a 1-D prompt).
        """
        ids = np.asarray(token_ids)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(
                "`token_ids` must be a non-empty [length] or [batch, length] "
                f"array of token ids. Received shape {ids.shape}"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(
                f"`token_ids` must hold integers. Received dtype {ids.dtype}"
            )
        vocab = self.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(
                f"`token_ids` must be in [0, {vocab}). Received values in "
                f"[{ids.min()}, {ids.max()}]"
            )
        validation.check_int("num_tokens", num_tokens, 0)
        temperature = validation.check_nonnegative("temperature", temperature)
        if not isinstance(cache, bool):
            raise TypeError(f"`cache` must be a bool. Received: {cache!r}")
        sampler = _sampler(sampler, temperature, seed)
        squeeze = ids.ndim == 1
        ids = np.atleast_2d(ids).astype(np.int32)
        if cache:
            logits, decode = self._cached_decoder(ids, num_tokens)
        for step in range(num_tokens):
            if not cache:
                logits = self.next_token_logits(ids)
            probabilities = sampler.compute_probabilities(logits)
            new = keras.ops.convert_to_numpy(
                sampler.get_next_token(probabilities)
            )
            new = new.reshape(-1, 1).astype(np.int32)
            ids = np.concatenate([ids, new], axis=1)
            if cache and step < num_tokens - 1:
                logits = decode(new)
        return ids[0] if squeeze else ids


_SAMPLERS = ("greedy", "top_k", "top_p", "random")


def _sampler(sampler, temperature, seed):
    """A `keras_hub.samplers.Sampler` from `generate`'s arguments."""
    from keras_hub import samplers

    if isinstance(sampler, samplers.Sampler):
        if temperature:
            raise ValueError(
                "`temperature` applies to a sampler given by name; a "
                "`Sampler` instance carries its own. Received: "
                f"temperature={temperature}, sampler={sampler!r}"
            )
        return sampler
    if sampler not in _SAMPLERS:
        raise ValueError(
            f"`sampler` must be one of {list(_SAMPLERS)} or a "
            f"keras_hub.samplers.Sampler. Received: sampler={sampler!r}"
        )
    if sampler == "greedy":
        if temperature > 0:
            return samplers.RandomSampler(seed=seed, temperature=temperature)
        return samplers.GreedySampler()
    kwargs = {"seed": seed, "temperature": temperature or 1.0}
    return {
        "top_k": samplers.TopKSampler,
        "top_p": samplers.TopPSampler,
        "random": samplers.RandomSampler,
    }[sampler](**kwargs)
