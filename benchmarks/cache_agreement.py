"""Cached generation against full re-solves: the checks, without flags.

`benchmarks/generation.py` reports these; the tests import them (a module
that defines absl flags cannot be imported next to another one that does).
"""

import numpy as np


def cached_logits(model, prompt, num_tokens):
    """Greedy continuation as `generate(cache=True)` makes it, and the
    logits of each new token."""
    logits, decode = model._cached_decoder(prompt, num_tokens)
    ids, steps = prompt, []
    for step in range(num_tokens):
        steps.append(logits.numpy())
        new = steps[-1].argmax(-1)[:, None].astype(np.int32)
        ids = np.concatenate([ids, new], 1)
        if step < num_tokens - 1:
            logits = decode(new)
    return ids, np.stack(steps, 1)


# The settings of the reference solve: a converged equilibrium.
TIGHT = {"solver": "broyden", "max_iter": 200, "tol": 1e-6}


def relative_error(logits, reference):
    """‖logits − reference‖ / ‖reference‖ per position."""
    return np.linalg.norm(logits - reference, axis=-1) / np.linalg.norm(
        reference, axis=-1
    )


def tight_logits(model, ids):
    """The full forward pass solved with `TIGHT`'s settings (restored)."""
    deq = model.deq
    saved = {name: getattr(deq, name) for name in TIGHT}
    try:
        for name, value in TIGHT.items():
            setattr(deq, name, value)
        return model(ids, training=False).numpy()
    finally:
        for name, value in saved.items():
            setattr(deq, name, value)


def agreement(model, prompts, new):
    """Greedy continuations and logits, cached against full re-solves.

    Args:
        model: a `DEQTransformerLM`.
        prompts: `[B, T]` int32 prompts.
        new: tokens to generate per prompt.

    Returns:
        A dict: `identical` continuations (of `prompts`), `differing`
        (per other prompt, the first differing new token and the logit
        margin there between the two candidates, relative to ‖logits‖,
        in the full re-solve), the fraction of equal new tokens, the median
        and max relative logit error of the cached path against the full
        re-solve and the fraction within 10 × tol, and the max error of
        each against a tightly solved (`TIGHT`) forward pass.
    """
    length = prompts.shape[1]
    cached = model.generate(prompts, new, cache=True)
    full = model.generate(prompts, new, cache=False)
    ids, steps = cached_logits(model, prompts, new)
    if not np.array_equal(ids, cached):
        raise AssertionError("decode_step and generate(cache=True) disagree.")
    # One full pass over the cached sequence: its logits at the positions
    # that predicted the new tokens (causal, so exactly a re-solve's).
    reference = model(cached[:, :-1], training=False).numpy()[:, length - 1 :]
    errors = relative_error(steps, reference)
    # Both paths stop within tol of the equilibrium only where their solve
    # converged within max_iter; a tight solve says which one is off where
    # they disagree more.
    exact = tight_logits(model, cached[:, :-1])[:, length - 1 :]
    ties = []
    for row in np.flatnonzero((cached != full).any(1)):
        t = int(np.argmax(cached[row] != full[row]))
        logits = model.next_token_logits(full[row : row + 1, :t]).numpy()[0]
        a, b = cached[row, t], full[row, t]
        ties.append(
            {
                "prompt": int(row),
                "position": t - length,
                "relative_margin": float(
                    abs(logits[a] - logits[b]) / np.linalg.norm(logits)
                ),
            }
        )
    return {
        "prompts": len(prompts),
        "new_tokens": new,
        "identical": int((cached == full).all(1).sum()),
        "differing": ties,
        "tokens_equal": float((cached == full)[:, length:].mean()),
        "logit_error_median": float(np.median(errors)),
        "logit_error_max": float(errors.max()),
        "within_10_tol": float((errors <= 10 * model.deq.tol).mean()),
        "cached_exact_error_max": float(relative_error(steps, exact).max()),
        "full_exact_error_max": float(relative_error(reference, exact).max()),
        "tight": TIGHT,
        "tol": float(model.deq.tol),
    }
