"""The examples in the package's docstrings run and give what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import slidejob
import slidejob.model
import slidejob.training

# slidejob.model and slidejob.training live in model/ and training/ (package-dir), so walk each.
MODULES = sorted(
    m.name
    for package in (slidejob, slidejob.model, slidejob.training)
    for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
