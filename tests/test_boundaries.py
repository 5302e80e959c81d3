"""Import boundaries of DESIGN.md: the simulator side imports without torch, and sim and
runtime never import each other (checked on the source, so a lazy import counts too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "traces", "policies", "sim", "runtime", "analysis")
# who may import whom (besides itself and third-party packages)
ALLOWED = {
    "core": set(),
    "traces": {"core"},
    "policies": {"core"},
    "sim": {"core", "traces", "policies"},
    "runtime": {"core", "traces", "policies"},
    "analysis": {"core", "traces", "policies", "sim", "runtime"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & set(PACKAGES)


def test_import_direction() -> None:
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for target in _imported_packages(path) - allowed - {pkg}:
                bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "import-boundary violations:\n" + "\n".join(bad)


def test_simulator_side_imports_without_torch() -> None:
    code = (
        "import sys, core, traces, policies, sim, traces.replay\n"
        "import pkgutil, importlib\n"
        "for pkg in ('core', 'traces', 'policies', 'sim'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        if not info.name.endswith('__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
