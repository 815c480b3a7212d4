"""Checkpoints that hold a layer's random-draw state."""


class SavedSeedState:
    """Saves and restores the states of the layer's seed generators.

    Keras saves a layer's variables but not its seed generators' states, so
    a run resumed from a checkpoint (`keras.callbacks.BackupAndRestore`)
    would replay the draws from the seed: other penalty gates and probes,
    other dropout masks, other random starts, other weights than an
    uninterrupted run. Mixed in before `keras.layers.Layer`, this makes
    each state one more saved entry: of the generators named in
    `saved_seed_generators` (attribute names; `seed_generator` by
    default). Files written without them still load (the states then stay
    as they are).
    """

    saved_seed_generators = ("seed_generator",)

    def _seed_keys(self):
        return {
            f"{name.lstrip('_')}_state": getattr(self, name)
            for name in self.saved_seed_generators
        }

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for key, generator in self._seed_keys().items():
            store[key] = generator.state

    def load_own_variables(self, store):
        for i, variable in enumerate(
            self._trainable_variables + self._non_trainable_variables
        ):
            variable.assign(store[f"{i}"])
        for key, generator in self._seed_keys().items():
            if key in store.keys():
                generator.state.assign(store[key])
