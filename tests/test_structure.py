"""How the code hangs together: no import cycles, nothing imports the entry point, scripts use the
library and not the launcher plugin's insides, and the plugin, which Hydra imports whenever any Hydra
app starts, imports neither torch nor resexp until it launches a sweep."""

import ast
import subprocess
import sys

from helpers import REPO

PACKAGES = ("resexp", "hydra_plugins")


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> set[str]:
    """The project modules that the file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from resexp import jobs`
    return {name for name in found if name.startswith(PACKAGES)}


def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    return {
        name: {target for target in imports(path) if target in files and target != name} for name, path in files.items()
    }


def test_no_module_imports_itself_back_through_others():
    edges = graph()

    def cycle_from(start, node, seen):
        for target in edges[node]:
            if target == start:
                return [node, target]
            if target not in seen:
                seen.add(target)
                if (rest := cycle_from(start, target, seen)) is not None:
                    return [node, *rest]
        return None

    # A package's __init__ importing its own modules is no cycle of the code's floors.
    cycles = [cycle_from(name, name, set()) for name in edges]
    cycles = [
        cycle for cycle in cycles if cycle and not any(m == n.rsplit(".", 1)[0] for m, n in zip(cycle, cycle[1:]))
    ]
    assert not cycles, cycles


def test_nothing_imports_the_entry_point_and_scripts_import_no_plugin():
    edges = graph()
    assert [name for name, targets in edges.items() if "resexp.cli" in targets] == ["resexp.__main__"]
    for script in (REPO / "scripts").glob("*.py"):
        assert not {name for name in imports(script) if name.startswith("hydra_plugins")}, script.name


def test_the_launcher_plugin_imports_neither_torch_nor_resexp_when_hydra_scans_it():
    code = (
        "import sys, hydra_plugins.resexp_launcher.shared_gpu_launcher; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'resexp')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
