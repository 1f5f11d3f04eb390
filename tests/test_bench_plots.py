"""``python -m ewtune.bench.plots``: BENCHMARKS.md's plots are drawn from the committed JSON results."""

import shutil
import struct
from pathlib import Path

from ewtune.bench.plots import accountant_figure, draw

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_both_plots_are_drawn_from_the_results(tmp_path):
    for name in ("accountant.json", "utility.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    written = draw(tmp_path)
    assert [path.name for path in written] == ["accountants.png", "utility.png"]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (900, 420)


def test_the_accountant_plot_has_one_line_per_accountant_with_a_figure():
    import json

    result = json.loads((RESULTS / "accountant.json").read_text())
    lines = {line.get_label(): line for line in accountant_figure(result).axes[0].get_lines() if not line.get_label().startswith("_")}
    certified = [100 * case["accountants"]["certified"]["relative_error"] for case in result["cases"]]
    assert list(lines["certified"].get_ydata()) == certified
    assert "edgeworth_bound" not in lines  # vacuous at these deltas: no point to draw
