"""Checkpoints that hold a layer's random-draw state."""


class SavedSeedState:
    """Saves and restores the state of the layer's `seed_generator`.

    Keras saves a layer's variables but not its seed generators' states, so
    a run resumed from a checkpoint (`keras.callbacks.BackupAndRestore`)
    would replay the draws from the seed: other penalty gates and probes,
    other dropout masks, other weights than an uninterrupted run. Mixed in
    before `keras.layers.Layer`, this makes the state one more saved entry.
    Files written without it still load (the state then stays as it is).
    """

    _SEED_KEY = "seed_generator_state"

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[self._SEED_KEY] = self.seed_generator.state

    def load_own_variables(self, store):
        for i, variable in enumerate(
            self._trainable_variables + self._non_trainable_variables
        ):
            variable.assign(store[f"{i}"])
        if self._SEED_KEY in store.keys():
            self.seed_generator.state.assign(store[self._SEED_KEY])
