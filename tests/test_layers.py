"""The layers hold: the pure core imports no I/O library, and only the store package talks to pymongo."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted(p for p in (ROOT / "addon" / "core").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("module", [p.stem for p in CORE])
def test_the_pure_core_imports_with_io_libraries_blocked(module):
    """Run in a fresh interpreter where importing mitmproxy, pymongo or requests raises."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mitmproxy', 'pymongo', 'bson', 'requests', 'urllib3'):\n"
        "            raise ImportError('blocked for the purity test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import addon.core.{module}\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "addon").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_store_package_imports_pymongo(path):
    if path.parent.name == "store":
        return
    assert not {"pymongo", "bson"} & _imports(path), f"{path.relative_to(ROOT)} talks to MongoDB directly"


@pytest.mark.parametrize("path", sorted((ROOT / "addon").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_in_package_import_is_optional(path):
    """An ImportError fallback silently switched features off when a module broke; imports must fail loudly."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            imports_addon = any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("addon")
                                for n in ast.walk(ast.Module(body=node.body, type_ignores=[])))
            catches_import_error = any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                                                      "ModuleNotFoundError")
                                       for h in node.handlers)
            assert not (imports_addon and catches_import_error), f"optional in-package import in {path}"
