"""Held-out evaluation: accuracy and macro-averaged F1 for classification, perplexity for causal LM
(the exponential of the mean next-token loss over all evaluated tokens); and the private release of an
evaluation: for classification its confusion matrix with Gaussian noise, for a causal LM its clipped loss sums.

Private evaluation (the only kind the agent daemon releases): the confusion matrix (true class x predicted
class counts) has L2 sensitivity 1 under add/remove-one, whatever the model: a record adds 1 to exactly one
cell. Adding N(0, sigma^2) to every cell is therefore the Gaussian mechanism with noise multiplier sigma, the
event PoissonGaussianEvent(sampling_rate=1, sigma, steps=1) in the ledger. Accuracy, macro F1 and the count
are computed from the noised matrix (post-processing, no further privacy cost). Predictions must depend on
each record alone, which holds in eval mode (no batch statistics) with each record padded by its own length alone
(:func:`ewtune.agent.data.length_batches`): padding to the longest record of a batch would let weights that make padded
positions non-finite spoil every shorter record's prediction, so that one long record moved many counts.

Private perplexity (causal LM): each record's mean next-token loss l_i (the training loss of
:func:`ewtune.agent.dpsgd.losses.causal_lm_loss`) is clipped to [0, B], a non-finite one counting as B, and the
record adds the vector (min(l_i, B) / B, 1) / sqrt(2) to a two-cell sum: its L2 norm is at most 1, so the sum
has L2 sensitivity 1 under add/remove-one and N(0, sigma^2) on each cell is the same Gaussian mechanism, the same
ledger event, as the noised confusion matrix. The released perplexity is exp(B * s_0 / s_1) of the noised cells
(post-processing): the exponential of the mean clipped per-record loss, which weights every record equally
(the exact :func:`evaluate_model` weights every token equally). B is :func:`loss_bound`, twice the loss of a
uniform guess over the vocabulary, public and the same for every holder of a model.

The forward passes run on the model's device (each batch is built on the CPU and copied there), under whatever
autocast the caller set; the confusion matrix and its noise stay on the CPU (a few cells).
"""

from __future__ import annotations

import math

import torch

from ewtune.agent.data import IGNORE_INDEX, Examples, length_batches
from ewtune.agent.device import batch_to, module_device
from ewtune.agent.dpsgd.losses import causal_lm_loss
from ewtune.agent.dpsgd.randomness import RandomSource, SecureRandom


def accuracy_and_macro_f1(predictions, labels) -> tuple[float, float]:
    """Accuracy, and the unweighted mean over classes (those seen in ``labels`` or ``predictions``) of the
    per-class F1 = 2 TP / (2 TP + FP + FN)."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if labels.numel() == 0:
        return math.nan, math.nan
    accuracy = (predictions == labels).double().mean().item()
    scores = []
    for cls in torch.unique(torch.cat([labels, predictions])):
        true_positive = ((predictions == cls) & (labels == cls)).sum().item()
        false_positive = ((predictions == cls) & (labels != cls)).sum().item()
        false_negative = ((predictions != cls) & (labels == cls)).sum().item()
        scores.append(2 * true_positive / (2 * true_positive + false_positive + false_negative))
    return accuracy, sum(scores) / len(scores)


@torch.no_grad()
def evaluate_model(model, examples: Examples, pad_token_id: int, task: str, batch_size: int = 64) -> dict[str, float]:
    """Metrics of ``model`` on ``examples``: accuracy, f1, loss, num_examples (classification) or loss,
    perplexity, num_examples (causal LM). The model is put in eval mode and left there."""
    model.eval()
    evaluate = _classification if task == "classification" else _causal_lm
    return evaluate(model, examples, pad_token_id, batch_size)


def _batches(model, examples: Examples, pad_token_id: int, task: str, batch_size: int):
    """The batches of ``examples``, each record with its own padding, on ``model``'s device."""
    device = module_device(model)
    for _, batch in length_batches(examples, pad_token_id, batch_size, task):
        yield batch_to(batch, device)


def _inputs(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def _classification(model, examples, pad_token_id, batch_size):
    predictions, labels, loss_sum = [], [], 0.0
    for batch in _batches(model, examples, pad_token_id, "classification", batch_size):
        logits = model(**_inputs(batch)).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    count = len(examples)
    if count == 0:
        return {"accuracy": math.nan, "f1": math.nan, "loss": math.nan, "num_examples": 0}
    accuracy, f1 = accuracy_and_macro_f1(torch.cat(predictions), torch.cat(labels))
    return {"accuracy": accuracy, "f1": f1, "loss": loss_sum / count, "num_examples": count}


def _causal_lm(model, examples, pad_token_id, batch_size):
    loss_sum, tokens = 0.0, 0
    for batch in _batches(model, examples, pad_token_id, "causal_lm", batch_size):
        logits = model(**_inputs(batch)).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        tokens += int((targets != IGNORE_INDEX).sum())
    loss = loss_sum / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else math.nan, "num_examples": len(examples)}


def loss_bound(vocab_size: int) -> float:
    """B of a private perplexity (module docstring): 2 ln V, twice the mean loss of a uniform guess over the V
    tokens of the vocabulary; a record whose mean loss is higher counts as B."""
    return 2.0 * math.log(vocab_size)


@torch.no_grad()
def clipped_loss_sums(model, examples: Examples, pad_token_id: int, bound: float, batch_size: int = 64) -> torch.Tensor:
    """The two cells (sum of min(l_i, B) / B, number of records) / sqrt(2) of ``examples`` (float64; the module
    docstring): every record adds a vector of L2 norm at most 1. The model is put in eval mode and left there."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in _batches(model, examples, pad_token_id, "causal_lm", batch_size):
        losses = causal_lm_loss(model(**_inputs(batch)), batch).double().cpu()
        clipped = torch.nan_to_num(losses, nan=bound, posinf=bound).clamp(0.0, bound) / bound
        sums += torch.stack([clipped.sum(), torch.tensor(float(len(clipped)), dtype=torch.float64)])
    return sums / math.sqrt(2.0)


def private_perplexity(sums: torch.Tensor, bound: float, noise_multiplier: float, source: RandomSource | None = None) -> dict[str, float]:
    """Perplexity, mean clipped loss and record count from :func:`clipped_loss_sums` after N(0, noise_multiplier^2)
    noise on both cells (the module docstring); the mean loss of the noised cells is kept within [0, B]
    (post-processing), and a noised count of at most zero releases no perplexity (NaN, which is never sent)."""
    source = source or SecureRandom()
    noised = sums.double() + source.standard_normal(2).double().cpu() * noise_multiplier
    scaled_losses, count = float(noised[0]), float(noised[1])
    if count <= 0:
        return {"perplexity": math.nan, "loss": math.nan, "num_examples": 0.0, "noise_multiplier": float(noise_multiplier)}
    loss = min(max(bound * scaled_losses / count, 0.0), bound)
    return {"perplexity": math.exp(loss), "loss": loss, "num_examples": count * math.sqrt(2.0),
            "noise_multiplier": float(noise_multiplier)}


def majority_baseline(labels) -> float:
    """The accuracy of always predicting the most frequent class of ``labels`` (NaN for none)."""
    labels = torch.as_tensor(labels)
    return float(torch.bincount(labels).max()) / len(labels) if labels.numel() else math.nan


@torch.no_grad()
def confusion_matrix(model, examples: Examples, pad_token_id: int, num_labels: int, batch_size: int = 64) -> torch.Tensor:
    """Counts [true class, predicted class] of ``model`` on ``examples`` (float64, num_labels x num_labels)."""
    model.eval()
    counts = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    for batch in _batches(model, examples, pad_token_id, "classification", batch_size):
        predicted = model(**_inputs(batch)).logits.float().argmax(dim=-1).clamp(0, num_labels - 1).cpu()
        counts.index_put_((batch["labels"].cpu(), predicted), torch.ones(len(predicted), dtype=torch.float64), accumulate=True)
    return counts


def metrics_from_confusion(counts: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro F1 (over the classes with any weight), the majority-class baseline (the accuracy of
    always predicting the most frequent true class) and the example count of a (possibly noised) confusion
    matrix; negative cells, which only noise produces, count as zero."""
    counts = counts.double().clamp(min=0.0)
    total = float(counts.sum())
    if total <= 0:
        return {"accuracy": math.nan, "f1": math.nan, "majority_baseline": math.nan, "num_examples": 0.0}
    true_positive = counts.diagonal()
    false_positive = counts.sum(dim=0) - true_positive
    false_negative = counts.sum(dim=1) - true_positive
    denominators = 2 * true_positive + false_positive + false_negative
    present = denominators > 0
    f1 = (2 * true_positive[present] / denominators[present]).mean().item() if bool(present.any()) else math.nan
    majority = float(counts.sum(dim=1).max()) / total
    return {"accuracy": float(true_positive.sum()) / total, "f1": f1, "majority_baseline": majority, "num_examples": total}


def private_metrics(counts: torch.Tensor, noise_multiplier: float, source: RandomSource | None = None) -> dict[str, float]:
    """The metrics of ``counts`` after N(0, noise_multiplier^2) noise on every cell (see the module docstring)."""
    source = source or SecureRandom()
    noise = source.standard_normal(counts.numel()).double().reshape(counts.shape) * noise_multiplier
    metrics = metrics_from_confusion(counts.double() + noise)
    metrics["noise_multiplier"] = float(noise_multiplier)
    return metrics
