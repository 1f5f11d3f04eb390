"""Held-out evaluation: accuracy and macro-averaged F1 for classification, perplexity for causal LM
(the exponential of the mean next-token loss over all evaluated tokens)."""

from __future__ import annotations

import math

import torch

from agent.data import IGNORE_INDEX, Examples, collate


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


def _batches(examples: Examples, pad_token_id: int, task: str, batch_size: int):
    for start in range(0, len(examples), batch_size):
        yield collate(examples, range(start, min(start + batch_size, len(examples))), pad_token_id, task)


def _inputs(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def _classification(model, examples, pad_token_id, batch_size):
    predictions, labels, loss_sum = [], [], 0.0
    for batch in _batches(examples, pad_token_id, "classification", batch_size):
        logits = model(**_inputs(batch)).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1))
        labels.append(batch["labels"])
    count = len(examples)
    if count == 0:
        return {"accuracy": math.nan, "f1": math.nan, "loss": math.nan, "num_examples": 0}
    accuracy, f1 = accuracy_and_macro_f1(torch.cat(predictions), torch.cat(labels))
    return {"accuracy": accuracy, "f1": f1, "loss": loss_sum / count, "num_examples": count}


def _causal_lm(model, examples, pad_token_id, batch_size):
    loss_sum, tokens = 0.0, 0
    for batch in _batches(examples, pad_token_id, "causal_lm", batch_size):
        logits = model(**_inputs(batch)).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        tokens += int((targets != IGNORE_INDEX).sum())
    loss = loss_sum / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else math.nan, "num_examples": len(examples)}
