"""Security rules, checked on the source: nothing from a cache, manifest, checkpoint or config file is
ever unpickled or executed."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("manifests", "cache", "extract", "train", "scripts")


def _calls():
    for d in PACKAGE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path.relative_to(ROOT), node


def _name(func) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def _kw(node, key):
    for k in node.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else "expr"
    return None


def test_no_unsafe_deserialisation_or_execution():
    problems = []
    for where, node in _calls():
        name = _name(node.func)
        if name == "torch.load" and _kw(node, "weights_only") is not True:
            problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
        if name == "np.load" and _kw(node, "allow_pickle") is not False:
            problems.append(f"{where}:{node.lineno} np.load without allow_pickle=False")
        if name in ("yaml.load", "yaml.unsafe_load", "pickle.load", "pickle.loads", "eval", "exec", "marshal.loads"):
            problems.append(f"{where}:{node.lineno} {name}")
    assert not problems, problems


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_caches_store_plain_numeric_arrays(toy_manifest, dtype):
    import numpy as np

    from mettle.cache import BackboneRecord, BlockLayout, plan_cache
    from mettle.cache.store import stored_arrays

    rec = BackboneRecord("b", "visual", "random-init", {}, (BlockLayout(0, "stage0.block0", 4, 8, (2, 2), 0),))
    meta = plan_cache(toy_manifest, {"visual": rec}, dtype=dtype,
                      targets={"masks": {"shape": [10, 4, 4], "dtype": "uint8", "missing": 255}})
    for name, _, dt in stored_arrays(meta):
        assert np.dtype(dt).kind in "fiu", (name, dt)  # never object arrays, never pickles
