"""The docstrings' runnable examples give the outputs they show."""

import doctest
import importlib
import pathlib
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq

# The backend modules of the other backends import what may not be
# installed (JAX's imports jax).
_OTHER_BACKENDS = {
    f"keras_deq.backend.{name}"
    for name in keras_deq.backend.SUPPORTED
    if name != keras_deq.backend.BACKEND
}


def _modules():
    names = ["keras_deq"]
    for info in pkgutil.walk_packages(keras_deq.__path__, "keras_deq."):
        if info.name not in _OTHER_BACKENDS:
            names.append(info.name)
    return sorted(names)


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples and test.name.startswith(name):
                tests.append(test)
    return tests


_TESTS = _doctests()


def test_there_are_examples_to_run():
    # The solvers' docstrings show their results on closed-form problems.
    assert len(_TESTS) >= 4, [t.name for t in _TESTS]


@pytest.mark.parametrize("test", _TESTS, ids=lambda t: t.name)
def test_docstring_example(test):
    test.globs.update(
        {"tf": tf, "keras": keras, "np": np, "keras_deq": keras_deq}
    )
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    result = runner.run(test, out=lambda text: print(text, end=""))
    assert result.failed == 0, f"{result.failed} of {result.attempted} failed"


def _documented():
    """The objects the API reference pages render, as (module, name)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"
    found = []
    for page in sorted(root.glob("*.md")):
        target, in_members = None, False
        for line in page.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(":::"):
                target, in_members = stripped[3:].strip(), False
                module, _, name = target.rpartition(".")
                try:
                    importlib.import_module(target)
                except ImportError:
                    found.append((module, name))
            elif stripped == "members:":
                in_members = True
            elif in_members and stripped.startswith("- "):
                found.append((target, stripped[2:]))
    return found


def test_the_api_reference_covers_the_public_api():
    documented = {name for _, name in _documented()}
    public = set(keras_deq.layers.__all__) | set(keras_deq.models.__all__)
    public |= {"DEQLayer"}
    assert public <= documented, public - documented


@pytest.mark.parametrize(
    "module, name", _documented(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_documented_object_has_an_example(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert "Examples:" in (obj.__doc__ or ""), f"{module}.{name}"
