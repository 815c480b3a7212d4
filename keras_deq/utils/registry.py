"""Named entries users can add to: the solvers and the gradient kinds."""


class Registry:
    """Entries by name, found with an error that names the argument.

    Args:
        kind: what an entry is, for messages (`"solver"`).
        register: the public function that adds one, for messages
            (`"keras_deq.solvers.register"`).
        entries: the built-in `(name, entry)` pairs.

    Examples:

        >>> colours = Registry("colour", "add_colour", {"red": 1})
        >>> colours.get("red", "colour")
        1
        >>> colours.add("blue", 2)
        >>> colours.names()
        ['blue', 'red']
    """

    def __init__(self, kind: str, register: str, entries: dict):
        self._kind = kind
        self._register = register
        self._entries = dict(entries)

    def get(self, name, argument: str):
        """The entry of `name`; a `ValueError` naming `argument` if none."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(
                f"`{argument}` must be one of {self.names()} (or a "
                f"{self._kind} added with {self._register}). "
                f"Received: {argument}={name!r}"
            )
        return self._entries[name]

    def add(self, name, entry) -> None:
        """Adds `entry` under `name`, which must be new."""
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"`name` must be a non-empty string. Received: name={name!r}"
            )
        if name in self._entries:
            raise ValueError(
                f"A {self._kind} is already registered as {name!r}."
            )
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)
