"""The import boundaries between the parts (docs/DESIGN.md, "Parts and boundaries"), read from the source of
every module, so that an import hidden in a function body counts too."""

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "accountant": {"torch", "flwr", "agent", "coordinator", "ewtune", "federation", "bench"},
    "federation": {"torch", "transformers", "agent", "coordinator", "ewtune", "bench"},
    "agent": {"coordinator", "ewtune", "bench"},
    "coordinator": {"agent", "ewtune", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_part_imports_only_what_its_boundary_allows(package):
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_probe_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from coordinator.packing import pack\n    import torch.nn\n")
    assert imported_packages(module) == {"coordinator", "torch"}


def test_the_app_bundle_names_the_contract_entry_points():
    from federation.apps import APP_DIR, CLIENT_APP, RUN_CONFIG_KEY, SERVER_APP

    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    assert RUN_CONFIG_KEY in app["config"]
    for component in (SERVER_APP, CLIENT_APP):
        module, _, attribute = component.partition(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
        assert f"\n{attribute} = " in (REPO / (module.replace(".", "/") + ".py")).read_text()
