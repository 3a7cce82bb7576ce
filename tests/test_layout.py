"""The shelf: which files sit at the top, and who may import whom, read from the import graph.

Scripts a user runs sit at the top level; every helper module lives in helpers/. A script imports
helpers and the three shared modules (models.py, datasets.py, transforms.py), never another script;
the plumbing (helpers/utils.py, helpers/errors.py) imports no model code. The graph is parsed from
the source (every import statement, also those inside functions), not from a hand-kept list.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"models.py", "train.py", "run_all.py", "pretrain_imagenet.py", "pretrain_spark.py", "compute_flops.py",
           "datasets.py", "transforms.py", "summarize_runs.py", "plot_results.py", "visualize.py", "ablation.py",
           "prune.py", "test_models.py", "hubconf.py"}
SHARED = {"models", "datasets", "transforms"}
PLUMBING = ("helpers.utils", "helpers.errors")
MODEL_CODE = {"models", "helpers.model_tools", "helpers.spark"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def project_modules() -> dict[str, Path]:
    files = [p for p in ROOT.glob("*.py")] + [p for p in (ROOT / "helpers").glob("*.py") if p.name != "__init__.py"]
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere in its source ('from helpers import a' -> helpers.a)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_top_level_holds_only_the_scripts() -> None:
    assert {p.name for p in ROOT.glob("*.py")} == SCRIPTS
    assert (ROOT / "helpers" / "__init__.py").is_file()


def test_no_script_imports_another_script() -> None:
    graph = import_graph()
    scripts = {name for name in graph if "." not in name}
    for name, imported in graph.items():
        other_scripts = {m for m in imported if m in scripts} - SHARED - {name}
        assert not other_scripts, f"{name} imports the script(s) {sorted(other_scripts)}"


def test_the_plumbing_imports_no_model_code() -> None:
    graph = import_graph()
    for name in PLUMBING:
        assert not reachable(graph, name) & MODEL_CODE, (name, sorted(reachable(graph, name)))
    assert reachable(graph, "models") <= {"helpers.errors"}   # models.py stands on the error type alone


def test_the_graph_test_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import train\n    from helpers import model_tools\n")
    assert imports_of(probe, {"train", "helpers.model_tools", "models"}) == {"train", "helpers.model_tools"}
