"""The docstrings' runnable examples give the outputs they show."""

import doctest
import importlib
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq


def _modules():
    names = ["keras_deq"]
    for info in pkgutil.walk_packages(keras_deq.__path__, "keras_deq."):
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
