"""The import boundaries between the parts (docs/DESIGN.md, "Parts and boundaries"), read from the source of
every module, so that an import hidden in a function body counts too."""

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ewtune"
PARTS = ("accountant", "agent", "bench", "coordinator", "federation", "report")
"""The parts, each a subpackage of ``ewtune``; the CLI layer is ``ewtune``'s own modules (named "ewtune" below)."""

FORBIDDEN = {
    "accountant": {"torch", "flwr", "agent", "coordinator", "ewtune", "federation", "bench", "report"},
    "federation": {"torch", "transformers", "agent", "coordinator", "ewtune", "bench"},
    "agent": {"coordinator", "ewtune", "bench"},
    "coordinator": {"agent", "ewtune", "bench"},
    "report": {"torch", "flwr", "agent", "coordinator", "ewtune", "bench"},
}


def part_of(module: str) -> str:
    """The part a dotted module name belongs to: ``ewtune.agent.daemon`` -> "agent", ``ewtune.cli`` -> "ewtune";
    any other package is named by its top-level name (``torch.nn`` -> "torch")."""
    top, _, rest = module.partition(".")
    if top == "ewtune":
        second = rest.partition(".")[0]
        return second if second in PARTS else "ewtune"
    return top


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(part_of(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: a relative import; the parts import each other by absolute name"
            if node.module == "ewtune":
                names.update(part_of(f"ewtune.{alias.name}") for alias in node.names)
            else:
                names.add(part_of(node.module))
    return names


def test_every_subpackage_of_ewtune_is_a_known_part():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(PARTS)
    assert set(FORBIDDEN) <= subpackages


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_part_imports_only_what_its_boundary_allows(package):
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((PACKAGE / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_probe_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ewtune.coordinator.packing import pack\n    import torch.nn\n"
                      "    from ewtune import agent\n    import ewtune.cli\n")
    assert imported_packages(module) == {"coordinator", "torch", "agent", "ewtune"}


def test_the_app_bundle_names_the_contract_entry_points():
    from ewtune.federation.apps import APP_DIR, CLIENT_APP, RUN_CONFIG_KEY, SERVER_APP

    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    assert RUN_CONFIG_KEY in app["config"]
    for component in (SERVER_APP, CLIENT_APP):
        module, _, attribute = component.partition(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
        assert f"\n{attribute} = " in (REPO / (module.replace(".", "/") + ".py")).read_text()


def test_the_cli_layer_and_the_benchmarks_do_not_import_each_other_both_ways():
    """ewtune/bench/ sits above the command line's orchestration (it runs local federations and audits); the command
    line finds the benchmarks by module name only (``ewtune.bench.cli`` in ewtune/cli.py), so there is no cycle."""
    top_level = {str(path.relative_to(REPO)): sorted(imported_packages(path) & {"bench"}) for path in sorted(PACKAGE.glob("*.py"))}
    assert {path: names for path, names in top_level.items() if names} == {}
