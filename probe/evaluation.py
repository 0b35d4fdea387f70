"""Validation for language models: loss, perplexity, top-1 token accuracy, under ``val/``.

Everything is summed on the device and logged as tensors, so a periodic
evaluation adds no host sync either; the numbers become Python floats on the
probe's sender thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def evaluate_lm(
    model: Any,
    batches: Iterable[tuple[Any, Any]],
    *,
    log: Callable[[dict[str, Any], int | None], None],
    step: int | None = None,
    prefix: str = "val/",
    ignore_index: int = -100,
) -> dict[str, Any]:
    """Mean token loss, perplexity and top-1 accuracy of ``model`` on ``(inputs, targets)``.

    ``model(inputs)`` may return logits ``(batch, time, vocab)`` or a tuple whose
    first element is the logits. Targets equal to ``ignore_index`` are skipped.
    The model is put in eval mode and restored afterwards. Returns the three
    0-d tensors (on the model's device), which are also logged.
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    loss_sum = correct = count = None
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                output = model(inputs)
                logits = output[0] if isinstance(output, (tuple, list)) else output
                logits = logits.reshape(-1, logits.shape[-1]).float()
                flat = targets.reshape(-1)
                keep = flat != ignore_index
                batch_loss = F.cross_entropy(
                    logits, flat, ignore_index=ignore_index, reduction="sum"
                )
                batch_correct = ((logits.argmax(dim=-1) == flat) & keep).sum()
                batch_count = keep.sum()
                loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
                correct = batch_correct if correct is None else correct + batch_correct
                count = batch_count if count is None else count + batch_count
    finally:
        model.train(was_training)
    if loss_sum is None or count is None or correct is None:
        raise ValueError("evaluate_lm needs at least one (inputs, targets) batch")
    tokens = count.clamp(min=1).float()
    mean_loss = loss_sum / tokens
    results = {
        f"{prefix}loss": mean_loss,
        f"{prefix}perplexity": torch.exp(mean_loss),
        f"{prefix}accuracy": correct.float() / tokens,
    }
    log(results, step)
    return results
