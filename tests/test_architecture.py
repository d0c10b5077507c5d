"""The package layout's rules (docs/ARCHITECTURE.md): one package per pipeline stage, no import cycle among
the modules (function-local imports included), and a core that imports neither Ray nor MLflow."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "contra_ray"
STAGES = ("data", "experts", "distill", "evaluate", "analyze", "tune", "export", "common")
# packages run as python -m contra_ray.<name>
ENTRY_POINTS = ("data", "distill", "evaluate", "analyze", "tune", "export")
#: the core: plain PyTorch, usable without a Ray cluster or a tracking store
CORE = ("contra_ray.data", "contra_ray.data.prepare", "contra_ray.data.loaders", "contra_ray.experts.training",
        "contra_ray.experts.curriculum", "contra_ray.experts.store", "contra_ray.distill.matching",
        "contra_ray.distill.memory", "contra_ray.distill.loop", "contra_ray.distill.distiller",
        "contra_ray.distill.checkpoint", "contra_ray.distill.artifact", "contra_ray.evaluate.training",
        "contra_ray.models", "contra_ray.augment", "contra_ray.config")
HEAVY = ("ray", "mlflow", "matplotlib", "ffcv", "datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """contra_ray modules imported anywhere in ``path`` (module level or inside functions)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name in MODULES}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module in MODULES:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in MODULES}
        elif isinstance(n, ast.ImportFrom) and n.level:
            raise AssertionError(f"{path}: relative import; the package uses absolute imports")
    return out


def test_one_package_per_stage_each_entry_point_runnable_with_python_m():
    for stage in STAGES:
        assert (PKG / stage / "__init__.py").is_file(), stage
    for stage in ENTRY_POINTS:
        assert (PKG / stage / "__main__.py").is_file(), stage
    flat = sorted(p.stem for p in PKG.glob("*.py"))
    assert flat == ["__init__", "_compat", "api", "augment", "config", "models", "nas", "pipeline", "plots", "report",
                    "tracking", "tracking_relay"], flat


def test_no_module_over_650_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 650}
    assert long == {}


def test_no_import_cycle_among_modules_function_local_imports_included():
    graph = {m: imported_modules(p) - {m} for m, p in MODULES.items()}

    def reachable(a):
        seen, todo = set(), [a]
        while todo:
            for b in graph[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    cycles = sorted(m for m in graph if m in reachable(m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_heavy_optional_packages_are_imported_inside_functions_only():
    """ray, mlflow, matplotlib, ffcv and datasets load when a function needs them, never when a module is imported."""
    at_top = []
    for m, p in MODULES.items():
        for n in ast.parse(p.read_text()).body:  # module-level statements only
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            at_top += [f"{m}: {x}" for x in names if x.split(".")[0] in HEAVY]
    assert at_top == []


def test_the_core_imports_neither_ray_nor_mlflow():
    code = (f"import sys; import {', '.join(CORE)}; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Whatever is imported first (a Ray worker unpickling a function, a user's script), no partially
    initialized package: each module imported with no contra_ray module loaded before it."""
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    for loaded in [m for m in sys.modules if m == 'contra_ray' or m.startswith('contra_ray.')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n"
            "print('ok', len(" + repr(names) + "))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", str(len(names))]
