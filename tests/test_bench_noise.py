"""``ewtune bench noise`` on the CPU: every source timed, the ratios taken against the right rows."""

from __future__ import annotations

import argparse
import json

import pytest

from ewtune.bench import noise as bench


@pytest.fixture
def keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the bench sets its --threads for the whole process


def test_bench_noise_times_each_source_and_compares_with_torch_randn(tmp_path, capsys, keep_torch_threads):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "noise.json"
    args = parser.parse_args(["--count", "5001", "--repeats", "3", "--devices", "cpu", "--json", str(out)])
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    names = ["aes-ctr (cpu) -> cpu", "chacha20 (cpu)", "torch.randn (cpu)"]
    names += ["g += z: aes-ctr (cpu)", "g += z: torch.randn (cpu)"]
    assert sorted(report["seconds"]) == sorted(names) and report["threads"] == 1
    assert all(len(report["seconds"][name]) == 3 and len(report["cpu_seconds"][name]) == 3 for name in names)
    per_second = report["normals_per_second"]
    aes, randn = per_second["aes-ctr (cpu) -> cpu"], per_second["torch.randn (cpu)"]
    assert report["time_vs_randn"]["aes-ctr (cpu) -> cpu"] == pytest.approx(randn / aes)
    assert report["time_vs_randn"]["torch.randn (cpu)"] == 1.0
    assert report["ratio_to_aes"]["torch.randn (cpu)"] == pytest.approx(randn / aes)
    assert report["cpu_time_vs_randn"]["torch.randn (cpu)"] == 1.0
    added, added_randn = per_second["g += z: aes-ctr (cpu)"], per_second["g += z: torch.randn (cpu)"]
    assert report["time_vs_randn"]["g += z: aes-ctr (cpu)"] == pytest.approx(added_randn / added)  # row against row
    table = capsys.readouterr().out
    assert "| aes-ctr (cpu) -> cpu | yes |" in table and "| torch.randn (cpu) | no |" in table
    assert "| g += z: aes-ctr (cpu) | yes |" in table and "| g += z: torch.randn (cpu) | no |" in table


def test_bench_noise_refuses_a_missing_gpu_in_one_line():
    import torch

    from ewtune.accountant.errors import InvalidInputError

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        bench.run(parser.parse_args(["--count", "10", "--devices", "cpu", "cuda"]))
