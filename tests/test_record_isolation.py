"""No record changes what another record contributes (issue 19).

The padding attack, performed with the real all-MiniLM-L6-v2 through the trainer's own batch path: weights a
hostile coordinator could send (finite, of the right dtype) make every padded position non-finite, either by
an attention score that overflows only between two pad positions (LoRA factors on the first layer's query and
key) or by a huge pad embedding (full mode). On a padded batch, every record shorter than the longest would
get a NaN loss and count for nothing, so adding one long record would remove all the others. Each test
compares neighbouring data sets (one long record added) and requires that only that record's contribution
changes: the noiseless clipped sums differ by at most the clip norm C, and the confusion matrix by one count.
(A record padded by its own length, to a multiple of 8, may be zeroed by such weights: that is its own fate.)

Then the split: neighbouring files (one record added) give training sets that differ in that record only.
"""

import pandas as pd
import pytest
import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.data import DataSpec, load_local_data, split_key
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.step import DPSGDStep
from ewtune.agent.evaluation import confusion_matrix
from ewtune.agent.training import LocalTrainer, TrainingConfig, only_head_trainable
from ewtune.agent.dpsgd_run import StepPlan

CLIP = 1.0
SHORT = ["a truly fine and moving film", "not good at all, sadly", "dull and slow and too long", "the cast is great in it"]
LONG = "an overlong, tedious and muddled mess of a long movie"  # 16 tokens, every SHORT one 8: no record has padding
LONG_LENGTH = 16                                               # of its own, the long one would pad the short ones
SCALE = 5.5e9  # the LoRA factors' entries; their product, 3e19, overflows a pad-pad attention score


@pytest.fixture(scope="module")
def minilm_dir():
    from ewtune.agent.assets import minilm_model_dir

    return minilm_model_dir()


def _data_file(directory, texts):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "data.csv"
    pd.DataFrame({"text": texts, "label": [1] * len(texts)}).to_csv(path, index=False)
    return str(path)


def _trainer(minilm_dir, tmp_path_factory, mode: str, texts) -> LocalTrainer:
    data_file = _data_file(tmp_path_factory.mktemp(f"{mode}-{len(texts)}"), texts)
    return LocalTrainer(TrainingConfig(model_dir=str(minilm_dir), data_file=data_file, mode=mode, eval_fraction=0.0,
                                       lora_rank=4, lora_alpha=4.0, insecure_seeded_randomness=True))


@pytest.fixture(scope="module")
def lora_pair(minilm_dir, tmp_path_factory):
    """LoRA trainers on neighbouring data sets, both holding the hostile adapters."""
    pair = [_trainer(minilm_dir, tmp_path_factory, "lora", texts) for texts in (SHORT, SHORT + [LONG])]
    state = _hostile_lora_state(pair[0])
    for trainer in pair:
        trainer.load_trainable_state(state)
    return pair


def _hostile_lora_state(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    """LoRA factors for the first layer's query and key that add SCALE^2 (v.x) e_0 to both, with v orthogonal
    to every real token's input to that layer and v.x >= 1 for a pad token at any position: the score between
    two pad positions overflows to +inf (NaN once the attention mask is added), every other score stays finite."""
    embeddings = trainer.model.get_base_model().encoder.embeddings
    with torch.no_grad():
        real = torch.cat([embeddings(input_ids=torch.tensor([ids])).squeeze(0) for ids in trainer.data.train.input_ids])
        pads = embeddings(input_ids=torch.zeros(1, 32, dtype=torch.long)).squeeze(0).double()
        basis, _ = torch.linalg.qr(real.T.double())
        direction = pads.mean(dim=0)
        direction -= basis @ (basis.T @ direction)
        direction /= (pads @ direction).min()
    state = trainer.trainable_state()
    for name, value in state.items():
        if "layer.0.attention.self.query" in name or "layer.0.attention.self.key" in name:
            value.zero_()
            if "lora_A" in name:
                value[0] = direction.float() * SCALE
            else:
                value[0, 0] = SCALE
    return state


def _noiseless_step_sum(trainer: LocalTrainer, head_only: bool = False, indices=None):
    """The clipped sum of the training records (all, or ``indices``) as the trainer's DP-SGD step forms it
    (the same batch function and engine as ``LocalTrainer.train``), without noise and with dropout off."""
    module, collate_fn = trainer.phase_inputs(head_only)
    indices = list(range(trainer.dataset_size)) if indices is None else indices
    with only_head_trainable(trainer.model, head_only):
        module.eval()
        clipper = PerExampleClipper(module, CLIP, trainer.loss_fn())
        try:
            optimizer = torch.optim.SGD(clipper.params.values(), lr=0.0)
            step = DPSGDStep(module, clipper, optimizer, 0.0, CLIP, 1.0, trainer.config.physical_batch_size)
            sums, stats = step.noisy_gradient(collate_fn(indices))
        finally:
            clipper.close()
    return torch.cat([grad.reshape(-1).double() for grad in sums.values()]), stats


def _assert_only_the_added_record_changes(without, with_long):
    (sum_without, stats_without), (sum_with, stats_with) = without, with_long
    assert torch.isfinite(stats_without.per_example_norms).all() and torch.isfinite(stats_with.per_example_norms).all()
    assert sum_without.norm() > 2 * CLIP  # the short records count (each is clipped to norm <= C)
    assert (sum_with - sum_without).norm() <= CLIP * (1 + 1e-4)


def test_the_hostile_adapters_do_poison_a_padded_batch(lora_pair):
    """The attack's premise: on one padded batch the short records' logits are NaN, alone they are finite."""
    from ewtune.agent.data import collate

    trainer = lora_pair[1]
    trainer.model.eval()
    inputs = lambda indices: {k: v for k, v in collate(trainer.data.train, indices, trainer.pad_token_id).items()  # noqa: E731
                              if k != "labels"}
    with torch.no_grad():
        padded = trainer.model(**inputs(range(5))).logits
        alone = trainer.model(**inputs([0])).logits
    long_row = [len(ids) for ids in trainer.data.train.input_ids].index(LONG_LENGTH)
    assert torch.isnan(padded[[i for i in range(5) if i != long_row]]).all() and torch.isfinite(alone).all()


def _neighbouring_steps(trainer: LocalTrainer):
    """The noiseless step sums of the batch without and with the long record."""
    long_row = [len(ids) for ids in trainer.data.train.input_ids].index(LONG_LENGTH)
    shorts = [i for i in range(trainer.dataset_size) if i != long_row]
    return _noiseless_step_sum(trainer, indices=shorts), _noiseless_step_sum(trainer)


def test_lora_step_a_long_record_changes_only_its_own_contribution(lora_pair):
    _assert_only_the_added_record_changes(*_neighbouring_steps(lora_pair[1]))


def test_head_mode_embedding_cache_a_long_record_changes_only_its_own_contribution(lora_pair):
    """LP-FT's probe phase on the embeddings cached through the hostile encoder."""
    _assert_only_the_added_record_changes(*(_noiseless_step_sum(trainer, head_only=True) for trainer in lora_pair))


def test_private_evaluation_a_long_record_moves_one_count(lora_pair):
    for trainer in lora_pair:
        with torch.no_grad():
            trainer.model.get_base_model().classifier.bias.copy_(torch.tensor([0.0, 100.0]))  # predicts 1 unless NaN
    counts = [confusion_matrix(trainer.model, trainer.data.train, trainer.pad_token_id, 2) for trainer in lora_pair]
    assert counts[0][1, 1] == len(SHORT)
    assert (counts[1] - counts[0]).abs().sum() == 1


@pytest.mark.slow  # about 40 s on two shared cores: every MiniLM weight's per-example gradient
def test_full_mode_huge_pad_embedding_a_long_record_changes_only_its_own_contribution(minilm_dir, tmp_path_factory):
    trainer = _trainer(minilm_dir, tmp_path_factory, "full", SHORT + [LONG])
    with torch.no_grad():  # finite, float32: the embedding's mean over its 384 features overflows
        trainer.model.encoder.embeddings.word_embeddings.weight[trainer.pad_token_id] = 3e38
    _assert_only_the_added_record_changes(*_neighbouring_steps(trainer))


def test_a_training_run_on_the_hostile_weights_counts_every_record(lora_pair):
    """Through ``LocalTrainer.train`` itself: every record of the step has a finite loss and gradient norm."""
    seen = []
    plan = StepPlan(steps=1, sampling_rate=1.0, noise_multiplier=1.0, clip_norm=CLIP, learning_rate=1e-9, optimizer="sgd")
    lora_pair[1].train(plan, on_step=lambda step, stats: seen.append(stats))
    assert seen[0].examples == len(SHORT) + 1 and torch.isfinite(seen[0].per_example_norms).all()


# --- the split ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from ewtune.agent.models import load_tokenizer

    return load_tokenizer(minilm_dir)


def _split(path, tokenizer, key, **spec):
    data = load_local_data(DataSpec(path=str(path), eval_fraction=0.3, split_key=key, **spec), tokenizer)
    return [tuple(ids) for ids in data.train.input_ids], [tuple(ids) for ids in data.eval.input_ids]


def test_neighbouring_files_give_splits_that_differ_in_the_added_record_only(tmp_path, tokenizer):
    key = split_key(tmp_path / "data.csv.split-key")
    texts = [f"review number {i} of the film" for i in range(60)]
    base = _data_file(tmp_path / "base", texts)
    for position, added in ((0, "a brand new review"), (30, "another one"), (60, "and a last one")):
        neighbour = _data_file(tmp_path / f"added-{position}", texts[:position] + [added] + texts[position:])
        (train, held_out), (train_plus, held_out_plus) = _split(base, tokenizer, key), _split(neighbour, tokenizer, key)
        changed = [set(train_plus) - set(train), set(held_out_plus) - set(held_out)]
        assert sorted(map(len, changed)) == [0, 1]  # the added record, on one side
        assert set(train) <= set(train_plus) and set(held_out) <= set(held_out_plus)  # nobody else moved
    assert 0 < len(held_out) < len(texts)


def test_the_split_key_is_made_once_private_and_decides_the_split(tmp_path, tokenizer):
    path = tmp_path / "data.csv.split-key"
    key = split_key(path)
    assert split_key(path) == key and path.stat().st_mode & 0o777 == 0o600 and len(key) == 32
    data_file = _data_file(tmp_path / "d", [f"sentence {i}" for i in range(80)])
    assert _split(data_file, tokenizer, key) != _split(data_file, tokenizer, split_key(tmp_path / "other-key"))


def test_max_examples_is_an_order_per_record(tmp_path, tokenizer):
    """Adding a record that is not among the kept ones changes nothing; the kept records never depend on row order."""
    key = split_key(tmp_path / "key")
    texts = [f"sentence {i}" for i in range(40)]
    kept = set(sum(_split(_data_file(tmp_path / "a", texts), tokenizer, key, max_examples=10), []))
    reversed_kept = set(sum(_split(_data_file(tmp_path / "b", texts[::-1]), tokenizer, key, max_examples=10), []))
    assert len(kept) == 10 and kept == reversed_kept


def test_the_daemons_split_key_is_secret_by_default_and_made_once(tmp_path, tiny_bert_dir, mr_csv):
    """What the daemon loads from agent.toml: a split key with the holder's state, beside the ledger (the data's
    folder may be read-only), 0600, reused at the next start."""
    from ewtune.agent.policy import load_agent_config

    data_file = tmp_path / "data.csv"
    data_file.write_bytes(mr_csv.read_bytes())
    (tmp_path / "agent.toml").write_text(
        '[holder]\nid = "h"\n[budget]\nepsilon = 8.0\ndelta = 1e-5\n[ledger]\npath = "state/ledger.jsonl"\nsigning_key = "k"\n[rpc]\naddress = "unix:agent.sock"\n'
        f'[training]\nmodel_dir = "{tiny_bert_dir}"\ndata_file = "data.csv"\nmax_length = 16\n')
    training = load_agent_config(tmp_path / "agent.toml").training
    key_file = tmp_path / "state" / "data.csv.split-key"
    assert training["split_key_file"] == str(key_file)
    (tmp_path / "state").mkdir()
    first = LocalTrainer(TrainingConfig(**training))
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = load_local_data(DataSpec(path=str(data_file), max_length=16, split_key=split_key(key_file)), first.tokenizer)
    assert again.eval.input_ids == first.data.eval.input_ids and first.data.eval.input_ids  # the same key, kept
    public = load_local_data(DataSpec(path=str(data_file), max_length=16), first.tokenizer)  # the seed's public key
    assert public.eval.input_ids != first.data.eval.input_ids


def test_a_max_length_that_pads_beyond_the_models_positions_is_refused(tmp_path, mr_csv):
    """Records pad to a multiple of 8 fixed by their own length: with 30 positions, max_length 30 would pad the
    longest records to 32 and fail them in the forward pass; the trainer refuses it in one line at load, and 24
    (the largest multiple of 8 that fits) trains."""
    from transformers import BertConfig, BertForSequenceClassification

    from ewtune.agent.assets import minilm_model_dir

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=30, num_labels=2)
    model_dir = tmp_path / "short"
    BertForSequenceClassification(config).save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_model_dir() / name).exists():
            (model_dir / name).write_bytes((minilm_model_dir() / name).read_bytes())
    settings = dict(model_dir=str(model_dir), data_file=str(mr_csv), mode="full", max_examples=40, device="cpu")
    with pytest.raises(InvalidInputError, match="max_length 30 pads to 32 tokens .* at most 24") as error:
        LocalTrainer(TrainingConfig(max_length=30, **settings))
    assert "\n" not in str(error.value)
    assert LocalTrainer(TrainingConfig(max_length=24, **settings)).dataset_size > 0
