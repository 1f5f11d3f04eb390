"""A holder's training as N torch.distributed workers (gloo on the CPU) has the privacy semantics of one process
(ewtune/agent/distributed): two workers release the same update as one process given the same batches and noise;
the noise is added once (its variance is sigma^2 C^2 / B^2, not twice that); each record joins each step with
probability q, in exactly one worker's shard; a worker killed in a step fails the run in one line, with the steps
begun charged to the ledger.

The first three run in one pair of worker processes (torch.multiprocessing, a gloo group on 127.0.0.1) over a tiny
random BERT built here; the last runs ``ewtune agent train-local --nproc 2`` through its own launcher, with a
follower that kills itself (SIGKILL) as its step K begins."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy import stats
from support.distributed import KILLING_LAUNCHER, spawned_results
from support.training import INTERRUPTING_LAUNCHER
from support.training import _holder_ledger as holder_ledger
from transformers import BertConfig, BertForSequenceClassification

from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.agent.distributed.group import WorkerGroup
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.losses import classification_loss
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom, SecureRandom
from ewtune.agent.dpsgd.step import DPSGDStep

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
RECORDS, LENGTH, VOCAB = 12, 16, 100
STEP_BATCHES = (list(range(RECORDS)), [1, 2, 5, 8, 9])  # the logical batches of test (a)'s two steps
CLIP, SIGMA, EXPECTED_BATCH, LEARNING_RATE = 0.7, 1.3, 6.0, 0.1
NOISE_ONLY = {"sigma": 1.7, "clip": 0.9, "expected_batch": 8.0, "steps": 5}
SAMPLING = {"records": 61, "rate": 0.3, "steps": 2000, "seed": 61}  # test (c) seeds rank r with seed + r


def _tiny_bert() -> BertForSequenceClassification:
    """A random 1-layer BERT without dropout, the same in every process (seeded)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(config).train()


def _records() -> dict[str, torch.Tensor]:
    """RECORDS right-padded token sequences of random lengths, with labels."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, LENGTH + 1, (RECORDS,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (RECORDS, LENGTH), generator=generator) * mask
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.randint(0, 2, (RECORDS,), generator=generator)}


def _batch(indices) -> dict[str, torch.Tensor]:
    indices = torch.as_tensor(indices, dtype=torch.int64)
    return {key: value[indices] for key, value in _records().items()}


class ReplayedNoise:
    """The engine's noise seam (its ``noise_source``) fed a fixed stream of standard normals."""

    name = "replayed"
    secure = False

    def __init__(self):
        self.generator = torch.Generator().manual_seed(99)

    def standard_normal(self, count, device=None):
        return torch.randn(count, generator=self.generator)


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps the update it was given at each step (the released, noised gradient)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.released: list[torch.Tensor] = []

    def step(self, closure=None):
        self.released.append(torch.cat([p.grad.reshape(-1).clone() for p in self.param_groups[0]["params"]]))
        return super().step(closure)


def _engine(model, optimizer, noise_source, group=None, sigma=SIGMA, clip=CLIP, expected_batch=EXPECTED_BATCH):
    settings = dict(model=model, clipper=PerExampleClipper(model, clip, classification_loss), optimizer=optimizer,
                    noise_multiplier=sigma, clip_norm=clip, expected_batch_size=expected_batch, physical_batch_size=4)  # fmt: skip
    return DPSGDStep(noise_source=noise_source, **settings) if group is None else group.engine(noise_source=noise_source, **settings)


def _trained(group=None) -> dict:
    """Test (a)'s two steps on the fixed batches and noise: the updates released, the parameters after, the
    realised batch sizes; in ``group``, on this worker's shard of each batch."""
    model = _tiny_bert()
    optimizer = RecordingSGD(list(model.parameters()), LEARNING_RATE)
    engine = _engine(model, optimizer, ReplayedNoise(), group)
    sizes = []
    for indices in STEP_BATCHES:
        mine = indices if group is None else [i for i in indices if i % group.world_size == group.rank]
        sizes.append(engine.step(_batch(mine)).examples)
    parameters = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"released": optimizer.released, "parameters": parameters, "examples": sizes}


def _noise_only_updates(group) -> list[torch.Tensor]:
    """Test (b): updates released from empty batches (zero clipped sums) with the secure source on rank 0."""
    model = _tiny_bert()
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.0), SecureRandom(), group, NOISE_ONLY["sigma"],
                     NOISE_ONLY["clip"], NOISE_ONLY["expected_batch"])  # fmt: skip
    updates = []
    for _ in range(NOISE_ONLY["steps"]):
        released, _ = engine.noisy_gradient({})
        updates.append(torch.cat([grad.reshape(-1) for grad in released.values()]))
    return updates


def _inclusions(group) -> torch.Tensor:
    """Test (c): which records this worker's sampler put in each step's batch (steps x records, 0/1). Each rank's
    draws are seeded (its own seed): the test is about the shards and the rate the sampler executes, and with the
    secure source its four statistical bounds together failed about 2 runs in 10^4 by chance."""
    source = InsecureSeededRandom(SAMPLING["seed"] + group.rank)
    sampler = group.sampler(SAMPLING["records"], SAMPLING["rate"], SAMPLING["steps"], source)
    joins = torch.zeros(SAMPLING["steps"], SAMPLING["records"], dtype=torch.int8)
    for step, indices in enumerate(sampler):
        joins[step, indices] = 1
    return joins


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        group = WorkerGroup(rank, WORLD_SIZE, torch.device("cpu"))
        results = {"trained": _trained(group), "noise_only": _noise_only_updates(group), "inclusions": _inclusions(group)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """What each of the two gloo workers computed, by rank."""
    out_dir = tmp_path_factory.mktemp("workers")
    return spawned_results(_worker, out_dir, WORLD_SIZE)


def test_two_workers_release_the_update_of_one_process_given_the_same_batches_and_noise(workers):
    alone = _trained()
    for worker in (worker["trained"] for worker in workers):
        assert worker["examples"] == alone["examples"] == [len(batch) for batch in STEP_BATCHES]
        for released, expected in zip(worker["released"], alone["released"], strict=True):
            assert released.abs().max() > 0.01  # a real update (noise std sigma C / B = 0.15)
            torch.testing.assert_close(released, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(worker["parameters"], alone["parameters"], rtol=1e-5, atol=1e-6)
    assert torch.equal(workers[0]["trained"]["parameters"], workers[1]["trained"]["parameters"])  # the workers stay equal, bit for bit
    two_noises = _trained_with_noise_on_every_rank()
    assert not torch.allclose(two_noises, alone["released"][0], atol=1e-3)  # the check above can fail


def _trained_with_noise_on_every_rank() -> torch.Tensor:
    """What test (a) would see if both workers added the replayed noise: the two shard sums, each with it."""
    released = []
    for rank in range(WORLD_SIZE):
        model = _tiny_bert()
        engine = _engine(model, RecordingSGD(list(model.parameters()), LEARNING_RATE), ReplayedNoise())
        released.append(engine.noisy_gradient(_batch([i for i in STEP_BATCHES[0] if i % WORLD_SIZE == rank]))[0])
    return torch.cat([(released[0][name] + released[1][name]).reshape(-1) for name in released[0]])


def test_the_noise_is_added_once(workers):
    expected_variance = (NOISE_ONLY["sigma"] * NOISE_ONLY["clip"] / NOISE_ONLY["expected_batch"]) ** 2
    steps = [torch.stack([worker["noise_only"][step] for worker in workers]) for step in range(NOISE_ONLY["steps"])]
    for both in steps:
        assert torch.equal(both[0], both[1])  # every worker holds the one released update
    updates = torch.cat([both[0] for both in steps]).double()
    count = updates.numel()
    assert count > 20_000
    # The sample variance of n normals has relative standard deviation sqrt(2 / n) (< 1% here): 5% is 5 of them,
    # and noise added on both workers would show as twice the variance.
    assert float(updates.var()) == pytest.approx(expected_variance, rel=0.05)
    assert abs(float(updates.mean())) < 5 * math.sqrt(expected_variance / count)
    assert not torch.equal(steps[0][0], steps[1][0])  # fresh noise at every step


def test_each_record_joins_each_step_with_probability_q_in_exactly_one_shard(workers):
    joins = [worker["inclusions"].numpy().astype(np.int64) for worker in workers]
    sampled_by = [set(np.flatnonzero(matrix.any(axis=0))) for matrix in joins]
    assert sampled_by[0].isdisjoint(sampled_by[1])
    assert sampled_by[0] | sampled_by[1] == set(range(SAMPLING["records"]))
    total = joins[0] + joins[1]
    assert total.max() == 1  # no record twice in a step
    q, steps = executable_sampling_rate(SAMPLING["rate"]), SAMPLING["steps"]
    counts = total.sum(axis=0)  # each ~ Binomial(steps, q)
    bound = 5 * math.sqrt(steps * q * (1 - q))  # per record (5 standard deviations of Binomial(steps, q))
    assert np.all(np.abs(counts - steps * q) < bound), counts
    assert abs(counts.mean() - steps * q) < 4 * math.sqrt(steps * q * (1 - q) / SAMPLING["records"])
    assert stats.chisquare(counts, np.full(len(counts), counts.mean())).pvalue > 1e-4
    sizes = total.sum(axis=1)  # batch sizes ~ Binomial(N, q) across the workers
    assert sizes.var(ddof=1) == pytest.approx(SAMPLING["records"] * q * (1 - q), rel=0.15)


def test_a_killed_worker_fails_the_run_in_one_line_with_the_steps_begun_charged(tiny_bert_dir, mr_csv, tmp_path):
    from ewtune.accountant.verify import verify_ledger

    kill_at = 3
    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(mr_csv), "--epsilon", "8", "--delta", "1e-5",
            "--mode", "head", "--probe-epochs", "3", "--probe-batch", "16", "--probe-lr", "0.5", "--max-examples", "80",
            "--max-length", "24", "--physical-batch-size", "16", "--device", "cpu", "--nproc", "2", "--quiet",
            *holder_ledger(tmp_path, 9.0)]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", KILLING_LAUNCHER, str(kill_at), *argv], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"ewtune: error: training failed (failed in step {kill_at} of ")
    assert lines[0].endswith(f"{kill_at} step(s) charged): WorkerFailed: worker 1 of 2 was killed by signal SIGKILL")

    entries = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    reserves = {entry["seq"]: entry["payload"] for entry in entries if entry["kind"] == "reserve"}
    closed = {entry["payload"]["reservation"]: entry for entry in entries if entry["kind"] in ("commit", "abort")}
    assert set(reserves) == set(closed), "a reservation was left open"
    probe = closed[max(reserves)]  # the count's reservation first, then the probe's
    assert probe["kind"] == "commit" and probe["payload"]["extra"]["phase"] == "probe"
    planned = reserves[max(reserves)]["event"]["event"]["steps"]
    assert probe["payload"]["event"]["event"]["steps"] == kill_at < planned
    assert probe["payload"]["extra"]["released"] is False
    assert probe["payload"]["extra"]["reason"] == f"failed in step {kill_at} of {planned} after {kill_at - 1} completed step(s); {kill_at} step(s) charged"
    report = verify_ledger(tmp_path / "ledger.jsonl")
    assert report.ok, report.summary()


def test_nproc_below_one_is_one_line(capsys):
    from ewtune.cli import main

    argv = ["agent", "train-local", "--model", "minilm", "--data", "mr", "--epsilon", "8", "--delta", "1e-5", "--nproc", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "ewtune: error: --nproc must be >= 1, got 0"


@pytest.mark.slow
def test_train_local_with_two_workers_charges_the_planned_steps_of_each_phase(tiny_bert_dir, mr_csv, tmp_path, capsys):
    from ewtune.accountant.verify import verify_ledger
    from ewtune.cli import main

    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(mr_csv), "--epsilon", "8", "--delta", "1e-5",
            "--probe-epochs", "1", "--probe-batch", "16", "--probe-lr", "0.5", "--mode", "lora", "--tune-epochs", "1",
            "--tune-batch", "16", "--tune-layers", "0", "--max-examples", "80", "--max-length", "24",
            "--physical-batch-size", "16", "--device", "cpu", "--nproc", "2", "--json", "--quiet", *holder_ledger(tmp_path, 9.0)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["processes"] == 2
    entries = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    reserves = {entry["seq"]: entry["payload"] for entry in entries if entry["kind"] == "reserve"}
    commits = {entry["payload"]["reservation"]: entry["payload"] for entry in entries if entry["kind"] == "commit"}
    phases = [commits[seq] for seq in sorted(reserves) if commits[seq].get("extra", {}).get("phase")]
    assert [phase["extra"]["phase"] for phase in phases] == ["probe", "tune"]
    for phase, reported in zip(phases, summary["phases"], strict=True):
        planned = reserves[phase["reservation"]]["event"]
        assert phase["event"] == planned  # every planned step ran, charged once for the whole group
        assert reported["event"] == planned and reported["train"]["steps"] == planned["event"]["steps"]
    assert verify_ledger(tmp_path / "ledger.jsonl").ok


def test_a_worker_per_gpu_is_refused_a_single_gpu_name():
    from ewtune.accountant.errors import InvalidInputError
    from ewtune.agent.distributed.launch import rank_device

    assert rank_device("cpu", 1, 2) == "cpu"
    assert rank_device("cuda:1", 0, 1) == "cuda:1"
    with pytest.raises(InvalidInputError, match="names one GPU for 2 workers"):
        rank_device("cuda:1", 0, 2)


@pytest.mark.slow
def test_a_long_lived_holder_steers_its_workers_with_weights_and_a_stop(tiny_bert_dir, mr_csv):
    """The daemon's use ([training] processes = 2): weights loaded on rank 0 reach the other worker (else the
    parameters' digests differ after the run and it fails), a stop asked on rank 0 ends every worker at the same
    step, and the group then trains again and closes."""
    from ewtune.agent.distributed.launch import start_workers
    from ewtune.agent.training import TrainingConfig
    from ewtune.agent.dpsgd_run import StepPlan

    config = TrainingConfig(model_dir=str(tiny_bert_dir), data_file=str(mr_csv), mode="head", max_examples=80, max_length=24,
                            physical_batch_size=16, device="cpu", processes=2)  # fmt: skip
    trainer = start_workers(config)
    try:
        assert trainer.group.world_size == 2
        loaded = {name: torch.full_like(value, 0.25) for name, value in trainer.trainable_state().items()}
        trainer.load_trainable_state(loaded)
        asked = []
        plan = StepPlan(steps=6, sampling_rate=0.2, noise_multiplier=1.0, clip_norm=1.0, learning_rate=0.1, head_only=True)
        stopped = trainer.train(plan, should_stop=lambda: asked.append(1) or len(asked) > 3)
        assert stopped.event.steps == stopped.metrics["steps"] == 3
        again = trainer.train(plan)
        assert again.event.steps == 6
    finally:
        trainer.group.close()
    assert trainer.group.followers.processes[0].returncode == 0


def test_a_worker_that_fails_to_start_is_one_line_before_anything_trains(tiny_bert_dir, mr_csv, monkeypatch):
    from ewtune.agent.distributed import launch
    from ewtune.agent.distributed.group import WorkerFailed
    from ewtune.agent.training import TrainingConfig

    failing = "import sys; print('first line'); print('ImportError: no module named cuda_kernels', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(launch, "FOLLOWER_COMMAND", [sys.executable, "-c", failing])
    threads = torch.get_num_threads()
    config = TrainingConfig(model_dir=str(tiny_bert_dir), data_file=str(mr_csv), device="cpu", processes=2)
    with pytest.raises(WorkerFailed) as failure:
        launch.start_workers(config)
    assert str(failure.value) == ("worker 1 of 2 exited with status 3: ImportError: no module named cuda_kernels, "
                                  "before the workers had joined")
    assert not dist.is_initialized() and torch.get_num_threads() == threads


@pytest.mark.slow
def test_ctrl_c_on_rank_0_charges_the_steps_begun_and_stops_the_workers(tiny_bert_dir, mr_csv, tmp_path):
    interrupt_at = 3
    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(mr_csv), "--epsilon", "8", "--delta", "1e-5",
            "--mode", "head", "--probe-epochs", "3", "--probe-batch", "16", "--probe-lr", "0.5", "--max-examples", "80",
            "--max-length", "24", "--physical-batch-size", "16", "--device", "cpu", "--nproc", "2", "--quiet",
            *holder_ledger(tmp_path, 9.0)]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", INTERRUPTING_LAUNCHER, str(interrupt_at), *argv], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert re.fullmatch(rf"ewtune: interrupted: interrupted after {interrupt_at} step\(s\) of \d+ began "
                        rf"\({interrupt_at - 1} completed\); {interrupt_at} step\(s\) charged", lines[0]), lines[0]  # fmt: skip
    entries = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    probe = [entry for entry in entries if entry["kind"] == "commit"][-1]["payload"]
    assert probe["extra"]["phase"] == "probe" and probe["event"]["event"]["steps"] == interrupt_at
