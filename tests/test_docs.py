"""The README's code blocks and every docstring example run as written."""
import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import adv_chain

README = Path(__file__).resolve().parents[1] / "README.md"
MODULES = sorted(m.name for m in pkgutil.walk_packages(adv_chain.__path__, "adv_chain."))


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README.read_text()))))
def test_readme_python_blocks_run(index):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[index]
    exec(compile(block, f"README.md block {index}", "exec"), {})


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
