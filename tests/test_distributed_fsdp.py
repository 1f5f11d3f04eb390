"""Full DP fine-tuning sharded with FSDP2 across two gloo workers (ewtune/agent/distributed/sharded.py) computes
what one process computes: the clipped sums and per-example norms of each worker's records equal the unsharded
engine's on the same records; the released update, with the single process's noise replayed shard by shard, equals
the single process's; the noise is added once (the variance of a noise-only update is sigma^2 C^2 / B^2, not twice
that); the parameters gathered back after two steps equal the single process's on every worker. A tiny random BERT
with 101 token ids and 3 labels, so that some parameters split unevenly (51 + 50 rows, 2 + 1); and a tiny Llama-style
decoder with tied embeddings takes the single process's step as a causal LM.

The last test runs ``ewtune agent train-local --nproc 2 --sharding fsdp`` end to end and reads each worker's
memory in its JSON."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support.distributed import spawned_results
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from ewtune.agent.distributed.group import WorkerFailed, WorkerGroup
from ewtune.agent.distributed.sharded import ShardedWorkerGroup
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.losses import causal_lm_loss, classification_loss
from ewtune.agent.dpsgd.randomness import SecureRandom
from ewtune.agent.dpsgd.step import DPSGDStep

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
RECORDS, LENGTH, VOCAB, LABELS = 12, 16, 101, 3
STEP_BATCHES = (list(range(RECORDS)), [1, 2, 5, 8, 9])
CLIP, SIGMA, EXPECTED_BATCH, LEARNING_RATE = 0.7, 1.3, 6.0, 0.01
NOISE_ONLY = {"sigma": 1.7, "clip": 0.9, "expected_batch": 8.0, "steps": 4}


def _tiny_bert() -> BertForSequenceClassification:
    """A random 2-layer BERT without dropout, the same in every process (seeded)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=LABELS, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(config).train()


def _batch(indices) -> dict[str, torch.Tensor]:
    """The records at ``indices`` of RECORDS right-padded token sequences of random lengths, with labels."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, LENGTH + 1, (RECORDS,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (RECORDS, LENGTH), generator=generator) * mask
    labels = torch.randint(0, LABELS, (RECORDS,), generator=generator)
    indices = torch.as_tensor(indices, dtype=torch.int64)
    return {"input_ids": input_ids[indices], "attention_mask": mask[indices], "labels": labels[indices]}


def _mine(indices, rank: int) -> list[int]:
    return [i for i in indices if i % WORLD_SIZE == rank]


class ReplayedNoise:
    """A fixed stream of standard normals, one parameter's worth at a time; with ``rank`` and the parameters'
    shapes, only that rank's rows (dim-0 chunks, as FSDP2 shards) of each parameter's normals, so that the
    workers together add exactly the single process's noise."""

    name = "replayed"
    secure = False

    def __init__(self, shapes=None, rank=None):
        self.generator = torch.Generator().manual_seed(99)
        self.shapes, self.rank, self.calls = shapes, rank, 0

    def standard_normal(self, count, device=None):
        if self.shapes is None:
            return torch.randn(count, generator=self.generator)
        shape = self.shapes[self.calls % len(self.shapes)]
        self.calls += 1
        full = torch.randn(math.prod(shape), generator=self.generator).reshape(shape[0], -1)
        rows = math.ceil(shape[0] / WORLD_SIZE)
        mine = full[self.rank * rows : (self.rank + 1) * rows].reshape(-1)
        assert mine.numel() == count
        return mine


def _engine(model, group=None, noise=None, sigma=SIGMA, clip=CLIP, expected_batch=EXPECTED_BATCH):
    """The engine of one process or of a worker of ``group``, with AdamW over the trainable parameters."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    settings = dict(model=model, clipper=PerExampleClipper(model, clip, classification_loss), optimizer=optimizer,
                    noise_multiplier=sigma, clip_norm=clip, expected_batch_size=expected_batch, physical_batch_size=4)  # fmt: skip
    if group is None:
        return DPSGDStep(noise_source=noise, **settings)
    return group.engine(noise_source=noise, **settings)


def _full(released: dict) -> torch.Tensor:
    return torch.cat([grad.full_tensor().reshape(-1) if hasattr(grad, "full_tensor") else grad.reshape(-1)
                      for grad in released.values()])  # fmt: skip


def _clipped_sums(group=None) -> dict:
    """Without noise: the update (the clipped sum / B) of test (a)'s first batch, and this worker's norms."""
    model = _tiny_bert()
    engine = _engine(model, group, sigma=0.0)
    indices = STEP_BATCHES[0] if group is None else _mine(STEP_BATCHES[0], group.rank)
    released, stats = engine.noisy_gradient(_batch(indices))
    update = _full(released)
    if group is not None:
        group.check_in_sync(model)  # the run ends: its shards go back into the model
    return {"update": update, "norms": stats.per_example_norms, "examples": stats.examples}


def _trained(group=None) -> dict:
    """Two steps on the fixed batches with the replayed noise: the updates released, the parameters after."""
    model = _tiny_bert()
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    engine = _engine(model, group, ReplayedNoise() if group is None else ReplayedNoise(shapes, group.rank))
    released = []
    for indices in STEP_BATCHES:
        update, _ = engine.noisy_gradient(_batch(indices if group is None else _mine(indices, group.rank)))
        released.append(_full(update))
        for name, param in engine.clipper.params.items():
            param.grad = update[name]
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
    if group is not None:
        group.check_in_sync(model)  # the shards gathered back into the model, and compared across the workers
    return {"released": released, "parameters": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


POISONED_TOKEN = 7  # its embedding row is made infinite: a record holding it has a non-finite loss


def _with_poisoned_record(indices) -> dict[str, torch.Tensor]:
    """Test (a)'s records at ``indices`` and then record 1 with its first token poisoned."""
    records = _batch([*indices, 1])
    records["input_ids"][-1, 0] = POISONED_TOKEN
    return records


def _nonfinite_sums(group=None) -> dict:
    """Without noise: the update and the examples counted when worker 1's only record has a non-finite loss (every
    worker computes its part again; worker 1, left with no record, runs a placeholder pass); in one process, on the
    same records."""
    model = _tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[POISONED_TOKEN] = math.inf
    engine = _engine(model, group, sigma=0.0)
    if group is None:
        records = _with_poisoned_record([0, 2, 4])
    else:
        records = _batch([0, 2, 4]) if group.rank == 0 else {key: value[-1:] for key, value in _with_poisoned_record([]).items()}
    released, stats = engine.noisy_gradient(records)
    update = _full(released)
    if group is not None:
        group.check_in_sync(model)
        refused = _refused_after_a_run_not_written_back(model, group)
    return {"update": update, "examples": stats.examples, "refused": None if group is None else refused}


def _refused_after_a_run_not_written_back(model, group) -> str:
    """A run whose shards were never gathered back (it failed) leaves the model released: the next is refused."""
    _engine(model, group, sigma=0.0)
    try:
        _engine(model, group, sigma=0.0)
    except WorkerFailed as refusal:
        return str(refusal)
    return ""


def _tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer Llama-style decoder (RMSNorm, rotary positions, grouped-query attention, tied embeddings)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).train()


def _causal_step(group=None) -> dict:
    """One noise-free step of the tiny Llama on test (a)'s first batch as a causal LM: the update, the parameters after."""
    model = _tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    settings = dict(model=model, clipper=PerExampleClipper(model, CLIP, causal_lm_loss), optimizer=optimizer,
                    noise_multiplier=0.0, clip_norm=CLIP, expected_batch_size=EXPECTED_BATCH, physical_batch_size=4)  # fmt: skip
    engine = DPSGDStep(**settings) if group is None else group.engine(noise_source=None, **settings)
    records = _batch(STEP_BATCHES[0] if group is None else _mine(STEP_BATCHES[0], group.rank))
    records["labels"] = records["input_ids"].masked_fill(records["attention_mask"] == 0, -100)
    update, _ = engine.noisy_gradient(records)
    for name, param in engine.clipper.params.items():
        param.grad = update[name]
    engine.optimizer.step()
    if group is not None:
        group.check_in_sync(model)
    return {"update": _full(update), "parameters": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}  # fmt: skip


def _noise_only_updates(group) -> list[torch.Tensor]:
    """Updates released from empty batches with each worker's secure source."""
    model = _tiny_bert()
    engine = _engine(model, group, SecureRandom(), NOISE_ONLY["sigma"], NOISE_ONLY["clip"], NOISE_ONLY["expected_batch"])
    updates = [_full(engine.noisy_gradient(_batch([]))[0]) for _ in range(NOISE_ONLY["steps"])]
    group.check_in_sync(model)
    return updates


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        group = ShardedWorkerGroup.of(WorkerGroup(rank, WORLD_SIZE, torch.device("cpu")))
        results = {"sums": _clipped_sums(group), "trained": _trained(group), "noise_only": _noise_only_updates(group),
                   "causal": _causal_step(group), "nonfinite": _nonfinite_sums(group)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """What each of the two gloo workers computed, by rank."""
    out_dir = tmp_path_factory.mktemp("fsdp_workers")
    return spawned_results(_worker, out_dir, WORLD_SIZE)


def test_sharded_clipped_sums_and_norms_equal_the_unsharded_engine_on_the_same_records(workers):
    alone = _clipped_sums()
    assert alone["update"].abs().max() > 1e-3
    for rank, worker in enumerate(workers):
        torch.testing.assert_close(worker["sums"]["update"], alone["update"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(worker["sums"]["norms"], alone["norms"][_mine(range(RECORDS), rank)], rtol=1e-5, atol=1e-7)
        assert worker["sums"]["examples"] == RECORDS
    one_worker_only = _engine(_tiny_bert(), sigma=0.0).noisy_gradient(_batch(_mine(STEP_BATCHES[0], 0)))[0]
    assert not torch.allclose(_full(one_worker_only), alone["update"], atol=1e-4)  # the comparison above can fail


def test_sharded_update_with_replayed_noise_and_parameters_after_equal_one_process(workers):
    alone = _trained()
    for worker in (worker["trained"] for worker in workers):
        for released, expected in zip(worker["released"], alone["released"], strict=True):
            assert released.abs().max() > 0.01  # noise std sigma C / B = 0.15
            torch.testing.assert_close(released, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(worker["parameters"], alone["parameters"], rtol=1e-5, atol=1e-6)
    assert torch.equal(workers[0]["trained"]["parameters"], workers[1]["trained"]["parameters"])
    assert not torch.allclose(alone["parameters"], torch.cat([p.detach().reshape(-1) for p in _tiny_bert().parameters()]))


def test_a_sharded_tied_llama_style_decoder_steps_as_one_process(workers):
    alone = _causal_step()
    assert alone["update"].abs().max() > 1e-3 and alone["tied"]
    for worker in (worker["causal"] for worker in workers):
        torch.testing.assert_close(worker["update"], alone["update"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(worker["parameters"], alone["parameters"], rtol=1e-5, atol=1e-7)
        assert worker["tied"]  # the tied embedding is one parameter again after the run


def test_a_non_finite_record_on_one_worker_is_dropped_as_in_one_process(workers):
    alone = _nonfinite_sums()
    assert torch.isfinite(alone["update"]).all() and alone["update"].abs().max() > 1e-3 and alone["examples"] == 4
    for worker in (worker["nonfinite"] for worker in workers):
        torch.testing.assert_close(worker["update"], alone["update"], rtol=1e-5, atol=1e-7)
        assert worker["examples"] == 4
        assert worker["refused"].startswith("an earlier sharded run failed and left the model's parameters released")


def test_sharded_noise_is_added_once_per_coordinate(workers):
    expected_variance = (NOISE_ONLY["sigma"] * NOISE_ONLY["clip"] / NOISE_ONLY["expected_batch"]) ** 2
    steps = [torch.stack([worker["noise_only"][step] for worker in workers]) for step in range(NOISE_ONLY["steps"])]
    for both in steps:
        assert torch.equal(both[0], both[1])  # every worker gathers the one released update
    updates = torch.cat([both[0] for both in steps]).double()
    assert updates.numel() > 20_000
    # relative standard deviation of a sample variance: sqrt(2 / n) < 1%; noise drawn twice would double it
    assert float(updates.var()) == pytest.approx(expected_variance, rel=0.05)
    assert not torch.equal(steps[0][0], steps[1][0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--nproc", "1", "--mode", "full", "--tune-layers", "0"], "sharding fsdp shards across N >= 2 worker processes, got 1"),
        (["--nproc", "2", "--mode", "lora"], "sharding fsdp is for full fine-tuning (mode full), got mode 'lora'"),
        (["--nproc", "2", "--mode", "full", "--tune-layers", "1"], "sharding fsdp trains the whole model, got tune_layers 1"),
    ],
)
def test_sharding_that_cannot_work_is_refused_in_one_line(options, message, capsys):
    from ewtune.cli import main

    argv = ["agent", "train-local", "--model", "minilm", "--data", "mr", "--epsilon", "8", "--delta", "1e-5",
            "--sharding", "fsdp", *options]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith(f"ewtune: error: {message}")


def test_agent_toml_sharding_without_the_processes_it_needs_is_refused_before_anything_loads(tmp_path, tiny_bert_dir,
                                                                                             mr_csv, capsys):
    from support.daemon import _agent_toml

    from ewtune.cli import main

    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    path.write_text(path.read_text().replace("[training]", '[training]\nsharding = "fsdp"\nmode = "full"'))
    assert main(["agent", "start", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "sharding fsdp shards across N >= 2 worker processes, got 1" in error


def test_train_local_sharded_trains_every_planned_step_and_reports_each_workers_shard(tiny_bert_dir, mr_csv, tmp_path):
    """The essential end-to-end check: train-local --nproc 2 --sharding fsdp (probe and full tune phases), its JSON."""
    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(mr_csv), "--epsilon", "8", "--delta", "1e-5",
            "--mode", "full", "--tune-layers", "0", "--probe-epochs", "1", "--probe-batch", "16", "--tune-epochs", "1",
            "--tune-batch", "16", "--max-examples", "80", "--max-length", "24", "--physical-batch-size", "8",
            "--device", "cpu", "--nproc", "2", "--sharding", "fsdp", "--json", "--quiet", "--output", str(tmp_path / "out")]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "ewtune", *argv], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["sharding"] == "fsdp" and summary["processes"] == 2
    assert 0.0 <= summary["accuracy"] <= 1.0  # rank 0 evaluated the whole trained model, alone
    tune = summary["phases"][-1]
    assert tune["phase"] == "tune" and tune["train"]["steps"] == tune["event"]["event"]["steps"] == tune["planned_steps"]
    workers = tune["train"]["workers"]
    whole = 4 * summary["trainable_parameters"]  # float32
    assert [worker["rank"] for worker in workers] == [0, 1]
    assert sum(worker["parameter_bytes"] for worker in workers) == whole  # the shards partition the parameters
    assert all(worker["parameter_bytes"] < 0.6 * whole and worker["peak_rss_bytes"] > 0 for worker in workers)
    assert all(worker["optimizer_state_bytes"] >= worker["parameter_bytes"] for worker in workers)
    assert (tmp_path / "out" / "run.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("dies_in", ["step", "clipped sum"])
def test_a_worker_killed_in_a_sharded_step_fails_the_run_in_one_line_with_the_steps_begun_charged(dies_in, tiny_bert_dir,
                                                                                                   mr_csv, tmp_path):
    """As with replicated workers (tests/test_distributed.py): the follower dies as its step 2 begins, or as its
    third micro-batch's clipped sum begins, while rank 0 waits in FSDP2's own all-gather of a forward pass."""
    from support.distributed import KILLING_LAUNCHER
    from support.training import _holder_ledger

    from ewtune.accountant.verify import verify_ledger

    kill_at = 2 if dies_in == "step" else 3
    launcher = KILLING_LAUNCHER if dies_in == "step" else KILLING_LAUNCHER.replace(
        "from ewtune.agent.dpsgd.step import DPSGDStep", "from ewtune.agent.dpsgd.engine import PerExampleClipper as DPSGDStep"
    ).replace("DPSGDStep.step", "DPSGDStep.clipped_grad_sum")
    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(mr_csv), "--epsilon", "8", "--delta", "1e-5",
            "--mode", "full", "--tune-layers", "0", "--probe-epochs", "0", "--tune-epochs", "1", "--tune-batch", "16",
            "--max-examples", "80", "--max-length", "24", "--physical-batch-size", "8", "--device", "cpu", "--nproc", "2",
            "--sharding", "fsdp", "--quiet", *_holder_ledger(tmp_path, 9.0)]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", launcher, str(kill_at), *argv], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    failed = re.fullmatch(r"ewtune: error: training failed \(failed in step (\d+) of \d+ after (\d+) completed step\(s\); "
                          r"(\d+) step\(s\) charged\): WorkerFailed: worker 1 of 2 was killed by signal SIGKILL", lines[0])  # fmt: skip
    assert failed, lines[0]
    begun = int(failed.group(1))
    assert int(failed.group(3)) == begun == int(failed.group(2)) + 1 and (dies_in != "step" or begun == kill_at)
    entries = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    tune = [entry for entry in entries if entry["kind"] == "commit" and entry["payload"].get("extra", {}).get("phase") == "tune"]
    assert len(tune) == 1 and tune[0]["payload"]["event"]["event"]["steps"] == begun
    assert verify_ledger(tmp_path / "ledger.jsonl").ok


@pytest.mark.slow
def test_bench_fsdp_memory_reports_each_workers_memory_for_both_shardings(tmp_path, capsys):
    from ewtune.cli import main

    out = tmp_path / "fsdp-memory.json"
    assert main(["bench", "fsdp-memory", "--scale", "tiny", "--json", str(out), "--markdown", str(tmp_path / "m.md")]) == 0
    runs = json.loads(out.read_text())["runs"]
    whole = 4 * runs["none"]["trainable_parameters"]
    for sharding, held in (("none", whole), ("fsdp", None)):
        workers = runs[sharding]["workers"]
        assert [worker["rank"] for worker in workers] == [0, 1] and runs[sharding]["steps"] >= 1
        assert all(worker["run_peak_rss_bytes"] > 0 and worker["optimizer_state_bytes"] >= 2 * worker["parameter_bytes"]
                   for worker in workers)  # fmt: skip (AdamW: two moments and a step count)
        if held is not None:
            assert all(worker["parameter_bytes"] == held for worker in workers)
    assert sum(worker["parameter_bytes"] for worker in runs["fsdp"]["workers"]) == whole
    assert "| fsdp | " in capsys.readouterr().out
