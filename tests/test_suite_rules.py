"""The suite's own rule: a test skipped because an import failed counts as a failure (a missing install step
must not pass in CI as a skip)."""

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_skip_for_a_failed_import_is_a_failure(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        "import pytest\n"
        "def test_needs_a_module_that_is_not_installed():\n"
        "    pytest.importorskip('a_module_that_is_not_installed')\n"
        "def test_skipped_on_purpose():\n"
        "    pytest.skip('not today')\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1)
