"""Import boundaries of DESIGN.md: the simulator side imports without torch, sim and runtime
never import each other (checked on the source, so a lazy import counts too), every package
is imported through the one ``moebits`` namespace, and no package has an import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "traces", "policies", "drive", "sim", "runtime", "train", "analysis")
# who may import whom (besides itself and third-party packages)
ALLOWED = {
    "core": set(),
    "traces": {"core"},
    "policies": {"core"},
    "drive": {"core", "traces", "policies"},
    "sim": {"core", "traces", "policies", "drive"},
    "runtime": {"core", "traces", "policies", "drive"},
    "train": {"core", "traces", "policies", "runtime"},
    "analysis": {"core", "traces", "policies", "drive", "sim", "runtime", "train"},
}


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by one file (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and _dynamic_import(node):  # importlib.import_module("moebits.x")
            out.append(node.args[0].value)  # type: ignore[attr-defined]
    return out


def _dynamic_import(node: ast.Call) -> bool:
    """``import_module("moebits...")`` / ``importlib.import_module(...)`` with a literal name."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return (name == "import_module" and bool(node.args) and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str) and node.args[0].value.startswith("moebits."))


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "moebits" and parts[1] in PACKAGES else None


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_import_direction() -> None:
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in _files(pkg):
            targets = {_package_of(m) for m in _imports(path)} - {None, pkg}
            bad += [f"{path.relative_to(ROOT)} imports moebits.{t}" for t in sorted(targets - allowed)]  # type: ignore[type-var]
    assert not bad, "import-boundary violations:\n" + "\n".join(bad)


def test_no_bare_top_level_imports() -> None:
    """Every import of a project package goes through ``moebits.``: a bare ``import sim`` would
    load a second copy of the module (two policy registries, two ``Precision`` classes)."""
    bad = []
    for path in [p for pkg in (*PACKAGES, "tests", "benchmarks", "moebits") for p in _files(pkg)]:
        bad += [f"{path.relative_to(ROOT)}: {m}" for m in _imports(path) if m.split(".")[0] in PACKAGES]
    assert not bad, "bare imports (use moebits.X):\n" + "\n".join(bad)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["moebits", *parts])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return [*stack, m, t]
            found = visit(t, [*stack, m]) if t not in state else None
            if found:
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        found = visit(m, []) if m not in state else None
        if found:
            return found
    return None


def test_no_import_cycles_within_packages() -> None:
    """Module-level import graph of each package is acyclic (function-local imports count too)."""
    for pkg in PACKAGES:
        modules = {_module_name(p): p for p in _files(pkg)}
        graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
        cycle = _find_cycle(graph)
        assert cycle is None, f"import cycle in {pkg}: {' -> '.join(cycle or [])}"


def test_dynamic_imports_count() -> None:
    """A lazy ``importlib.import_module("moebits.x")`` is an import edge too."""
    tree = ast.parse('import importlib\nimportlib.import_module("moebits.runtime.grouped")\n')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [_dynamic_import(c) for c in calls] == [True]


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_simulator_side_imports_without_torch() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "for pkg in ('moebits.core', 'moebits.traces', 'moebits.policies', 'moebits.drive', 'moebits.sim'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        if not info.name.endswith('__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "bare = sorted(m for m in ('core', 'traces', 'policies', 'drive', 'sim', 'runtime', 'train', 'analysis') if m in sys.modules)\n"
        "assert not bare, bare\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_console_entry_point_lists_every_package() -> None:
    proc = subprocess.run([sys.executable, "-m", "moebits", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for sub in ("sim", "runtime", "traces", "train", "analysis"):
        assert f"  {sub} " in proc.stdout
