"""``ewtune bench noise``: how fast each source draws standard normals, in one run, on every device present.

Sources, interleaved ``--repeats`` times at ``--count`` normals each (medians compared in the same run):

- ``aes-ctr (cpu)``: :class:`ewtune.agent.dpsgd.randomness.SecureRandom`, the landed secure source (AES-256-CTR
  keystream on one CPU core, Box-Muller in float64), then copied to the device the gradients live on;
- ``chacha20 (DEVICE)``: :class:`ewtune.agent.dpsgd.chacha.ChaChaRandom`, secure, computed on the device itself;
- ``torch.randn (DEVICE)``: torch's own generator (Mersenne Twister on the CPU, Philox on CUDA), which is
  *not* cryptographically secure: the speed a DP step would have if noise cost nothing extra;
- on the CPU, ``g += z: ...``: what a DP step does with the noise, ``g += z`` into a gradient-sized
  float32 tensor: :meth:`ewtune.agent.dpsgd.randomness.SecureRandom.add_standard_normal_` (never storing z)
  against ``g.add_(torch.randn(n))``; these two rows are compared with each other.

The ratios reported are each source's normals per second over the landed AES path's, and each source's time
over torch.randn's on the same device at the same thread count (issue 24's CPU goal: at most 1.5x), by wall
time and by the process's CPU time: on a shared machine time-sharing inflates the wall time of whichever draw
another job interrupts, not its CPU time, which at one thread equals the wall time on an idle core (at two it is
the sum over both threads). On a GPU the AES row includes the copy to the device, as a DP step on the GPU pays it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench.report import machine, median, positive_int, timed, write

_ADDED = "g += z:"  # the rows that add the normals to a gradient-sized tensor, as a DP step does


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", default="4000000", metavar="N", help="normals per draw (default 4,000,000)")
    parser.add_argument("--repeats", default="5", metavar="N", help="draws per source (default 5)")
    parser.add_argument("--threads", default="1", metavar="N",
                        help="torch intra-op threads on the CPU (default 1, as `ewtune bench dpsgd`: on a shared machine "
                        "two threads wait on each other whenever the other core is busy)")
    parser.add_argument("--devices", nargs="+", default=None, help="devices to measure (default: cpu and cuda if present)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown table to PATH")


def sources(device: str) -> dict[str, Any]:
    """Name -> a function drawing ``count`` normals that ends when they are on ``device``."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.agent.dpsgd.chacha import ChaChaRandom
    from ewtune.agent.dpsgd.randomness import SecureRandom

    aes, chacha = SecureRandom(), ChaChaRandom(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def finished(draw):
        def run(count: int):
            out = draw(count)
            sync()
            return out

        return run

    draws = {
        f"aes-ctr (cpu) -> {device}": finished(lambda n: aes.standard_normal(n).to(device)),
        f"chacha20 ({device})": finished(chacha.standard_normal),
        f"torch.randn ({device})": finished(lambda n: torch.randn(n, device=device)),
    }
    if device == "cpu":
        gradients: dict[int, torch.Tensor] = {}

        def gradient(count: int) -> torch.Tensor:  # one tensor per count, as a step's gradient is reused
            return gradients.setdefault(count, torch.zeros(count))

        draws[f"{_ADDED} aes-ctr (cpu)"] = lambda n: aes.add_standard_normal_(gradient(n), 1.0)
        draws[f"{_ADDED} torch.randn (cpu)"] = lambda n: gradient(n).add_(torch.randn(n))
    return draws


def run(args: argparse.Namespace) -> int:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    count, repeats = positive_int("--count", args.count), positive_int("--repeats", args.repeats)
    threads = positive_int("--threads", args.threads)
    torch.set_num_threads(threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInputError(f"device {device} was asked for but CUDA is not available here")
    before = machine()
    seconds: dict[str, list[float]] = {}
    cpu_seconds: dict[str, list[float]] = {}
    for device in devices:
        draws = sources(device)
        for draw in draws.values():
            draw(1024)  # warm-up: first-call allocation and kernel set-up
        for _ in range(repeats):
            for name, draw in draws.items():
                cpu_start = time.process_time()
                seconds.setdefault(name, []).append(timed(lambda: draw(count))[1])
                cpu_seconds.setdefault(name, []).append(time.process_time() - cpu_start)
    per_second = {name: count / median(values) for name, values in seconds.items()}
    cpu_median = {name: median(values) for name, values in cpu_seconds.items()}
    report: dict[str, Any] = {
        "command": f"ewtune bench noise --count {count} --repeats {repeats} --threads {threads} --devices {' '.join(devices)}",
        "count": count,
        "threads": threads,
        "devices": devices,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine_before": before,
        "machine_after": machine(),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "normals_per_second": per_second,
        "ratio_to_aes": {name: rate / per_second[_aes_name(name)] for name, rate in per_second.items()},
        "time_vs_randn": {name: per_second[_randn_name(name)] / rate for name, rate in per_second.items()},
        "cpu_time_vs_randn": {name: cpu / cpu_median[_randn_name(name)] for name, cpu in cpu_median.items()},
    }
    write(report, render_markdown(report), args.json, args.markdown)
    return 0


def _device_of(name: str) -> str:
    return name[name.rindex("(") + 1 : -1] if not name.startswith("aes") else name.rsplit(" ", 1)[1]


def _aes_name(name: str) -> str:
    return f"{_ADDED} aes-ctr (cpu)" if name.startswith(_ADDED) else f"aes-ctr (cpu) -> {_device_of(name)}"


def _randn_name(name: str) -> str:
    return f"{_ADDED} torch.randn (cpu)" if name.startswith(_ADDED) else f"torch.randn ({_device_of(name)})"


def render_markdown(report: dict[str, Any]) -> str:
    loads = f"{report['machine_before']['load_average'][0]:.2f} -> {report['machine_after']['load_average'][0]:.2f}"
    lines = [
        f"`{report['command']}`: {report['count']:,} standard normals a draw, medians of interleaved draws; "
        f"{report['threads']} torch thread(s); "
        f"load average (1 min) {loads} on {report['machine_before']['cpus']} CPUs"
        + (f"; GPU {report['gpu']}." if report["gpu"] else "; no GPU."),
        "",
        "| source | secure | median wall s | median CPU s | normals / s (wall) | ratio to aes-ctr "
        "| wall x torch.randn | CPU x torch.randn |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in report["seconds"].items():
        secure = "no" if "torch.randn" in name else "yes"
        lines.append(
            f"| {name} | {secure} | {median(values):.4f} | {median(report['cpu_seconds'][name]):.4f} "
            f"| {report['normals_per_second'][name] / 1e6:.1f} M | {report['ratio_to_aes'][name]:.2f}x "
            f"| {report['time_vs_randn'][name]:.2f}x | {report['cpu_time_vs_randn'][name]:.2f}x |"
        )
    return "\n".join(lines) + "\n"
