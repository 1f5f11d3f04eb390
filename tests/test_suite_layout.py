"""The suite's layout: no test module imports another (shared helpers live in tests/support and the helper modules
beside the tests), so that a test module's imports name what it needs and running one file runs only that file."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (``test_*``) that the module at ``path`` imports, anywhere in it."""
    imported = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
    return [name for name in imported if name.split(".")[-1].startswith("test_") or name.startswith("tests.")]


def test_no_test_module_imports_another():
    sources = sorted(TESTS.glob("*.py")) + sorted((TESTS / "support").glob("*.py"))
    offenders = {str(path.relative_to(TESTS)): names for path in sources if (names := imported_test_modules(path))}
    assert offenders == {}


def test_an_import_of_a_test_module_is_found_at_any_depth(tmp_path):
    module = tmp_path / "test_example.py"
    module.write_text("import os\nfrom support.daemon import HOLDER\n\ndef helper():\n    from test_daemon import PLAN\n")
    assert imported_test_modules(module) == ["test_daemon"]
