"""The dependency rule: manifests <- cache <- {extract, train}; train never imports extract."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {  # package -> the mettle packages it may import
    "manifests": {"manifests"},
    "cache": {"manifests", "cache"},
    "train": {"manifests", "cache", "train"},
    "extract": {"manifests", "cache", "extract", "train"},
}


def _mettle_imports(path: Path, package: str) -> set[str]:
    """Top-level mettle packages imported by a module (absolute and relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    depth = len(path.relative_to(ROOT / package).parts)  # 1 for package/x.py, 2 for package/sub/x.py
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level > depth:  # climbs out of the package: from ..cache import x
                names = ["mettle." + (node.module or "")]
            else:
                names = [f"mettle.{package}"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mettle" and len(parts) > 1 and parts[1]:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_static_imports_follow_the_rule(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        extra = _mettle_imports(path, package) - ALLOWED[package]
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"imports against the dependency rule: {bad}"


def test_importing_train_loads_no_extract_and_no_backbone_code():
    code = ("import sys, mettle.train, mettle.cache; "
            "bad = [m for m in sys.modules if m.startswith('mettle.extract') or m in ('timm', 'av')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_importing_mettle_loads_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, mettle, mettle.manifests; sys.exit('torch' in sys.modules)"])
    assert r.returncode == 0


def test_rule_checker_catches_a_violation(tmp_path, monkeypatch):
    """The static check itself must be able to fail."""
    fake = tmp_path / "train"
    fake.mkdir()
    (fake / "bad.py").write_text("from ..extract import media\nimport mettle.extract.media\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _mettle_imports(fake / "bad.py", "train") == {"extract"}
