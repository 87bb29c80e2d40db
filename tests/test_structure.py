"""How the code hangs together: no import cycles, nothing imports the entry point, scripts use the
library and not the launcher plugin's insides, and the plugin, which Hydra imports whenever any Hydra
app starts, imports neither torch nor resexp until it launches a sweep. resexp/models/ is the one door to
the model families, which nothing else names, and every preset keeps the identity its runs recorded."""

import ast
import json
import re
import subprocess
import sys

import identities
import pytest
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


# What names a model family in code: its modules' classes, its own keys, its names (docstrings and
# comments aside: they may say which paper a choice follows).
FAMILY = re.compile(
    r"densenet|resnext|\bwrn|preact|pre-activation|gated|highway|growth_rate|cardinality|base_width|NetSpec|"
    r"compression|bottleneck_stride|gate_bias|ZeroPad|Concatenate|BasicBlock|Bottleneck|DenseLayer",
    re.IGNORECASE,
)


def names_in_code(path) -> set[str]:
    """The family words in a module's code: its names, attributes, imports and strings, not its docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    found = set()
    for node in ast.walk(tree):
        texts = {
            ast.Name: lambda n: n.id,
            ast.Attribute: lambda n: n.attr,
            ast.alias: lambda n: n.name,
            ast.arg: lambda n: n.arg,
            ast.FunctionDef: lambda n: n.name,
            ast.ClassDef: lambda n: n.name,
        }
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif type(node) in texts:
            text = texts[type(node)](node)
        else:
            continue
        found.update(match.group(0).lower() for match in FAMILY.finditer(text) if "Decompression" not in text)
    return found


def test_no_module_outside_the_models_package_names_a_family_but_the_papers_numbers():
    outside = [
        path
        for package in (*PACKAGES, "scripts")
        for path in (REPO / package).rglob("*.py")
        if "models" not in path.relative_to(REPO).parts
    ]
    naming = {module_name(path): sorted(words) for path in outside if (words := names_in_code(path))}
    assert set(naming) == {"resexp.paper"}, naming  # the published numbers are by the papers' net names


def test_the_models_package_has_one_door():
    edges = graph()
    edges.update({script.name: imports(script) for script in (REPO / "scripts").glob("*.py")})
    inside = {path.stem for path in (REPO / "resexp" / "models").glob("*.py")} - {"__init__"}
    entered = {
        ".".join(target.split(".")[:3])
        for name, targets in edges.items()
        if not name.startswith("resexp.models")
        for target in targets
        if target.startswith("resexp.models.")
    }
    assert not {door for door in entered if door.split(".")[2] in inside}, entered  # resexp.models alone


@pytest.mark.slow
def test_every_preset_on_every_dataset_keeps_the_identity_and_name_its_runs_recorded():
    recorded = json.loads(identities.RECORD.read_text())
    now = identities.record()
    changed = {case: (recorded.get(case), found) for case, found in now.items() if recorded.get(case) != found}
    assert set(now) == set(recorded) and not changed, changed


def test_the_config_edge_builds_a_saved_run_without_importing_evaluation_code():
    assert "resexp.evaluate" not in graph()["resexp.config"]  # resexp/saved.py reads a run; saved_commands evaluates
