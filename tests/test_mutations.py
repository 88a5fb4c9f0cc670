"""The hand-run mutation script cannot rot: every wrong version it holds still applies, and names tests that exist.

Runs no test itself (tests/mutations.py takes minutes); it only reads the files a mutation would break and check.
"""
import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_mutations():
    spec = importlib.util.spec_from_file_location("llmnb_mutations", ROOT / "tests" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.MUTATIONS


MUTATIONS = load_mutations()


def test_names_are_unique_so_that_only_picks_what_it_says():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name[:60])
def test_each_mutation_breaks_one_place_and_names_tests_that_exist(mutation):
    text = (ROOT / mutation.file).read_text()
    assert text.count(mutation.old) == 1, f"{mutation.file} holds the line to break {text.count(mutation.old)} times, not once: update the mutation"
    assert mutation.old != mutation.new
    assert mutation.tests, "a mutation names the tests that must catch it"
    for target in mutation.tests:
        file, _, name = target.partition("::")
        path = ROOT / file
        assert path.is_file(), f"{target}: no such test file"
        if name:
            defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
            assert name.split("[")[0] in defined, f"{target}: no such test in {file}"
