"""One epoch's bookkeeping, the same in both training loops: running totals, the history entry, the divergence check.

``benchmark.engine.train.train`` trains one model and ``benchmark.execution.packing.train`` a pack
of them; both build each epoch's history entry and each divergence error here, so a record means
the same whichever loop trained it (docs/design.md, Reproducibility).
"""

from __future__ import annotations

import torch


class Diverged(RuntimeError):
    """The loss became NaN or infinite; training stopped instead of going on with garbage."""


#: Steps between two looks at a batch's loss for divergence (each look waits for a GPU), besides
#: the look at the epoch's summed loss at its end.
DIVERGENCE_CHECK_STEPS = 50


def divergence(epoch: int, step: int, value: float, lr: float) -> Diverged:
    """The error of a loss that became ``value`` (NaN or infinite) at ``step`` of ``epoch`` (0-based),
    in a schedule of peak learning rate ``lr``."""
    return Diverged(f"loss became {value} at epoch {epoch + 1}, step {step} (lr={lr}); "
                    f"training stopped. Lower the learning rate or the regularization strength.")


def check_finite(loss: torch.Tensor, epoch: int, step: int, lr: float) -> None:
    """Raise ``divergence`` when the (one-element) ``loss`` is NaN or infinite."""
    if not torch.isfinite(loss):
        raise divergence(epoch, step, float(loss), lr)


class EpochTotals:
    """One epoch's running training loss and correct predictions: of one model (``models`` None),
    or of each model of a pack (one entry per model)."""

    def __init__(self, device: torch.device, models: int | None = None):
        shape = () if models is None else (models,)
        self.loss_sum = torch.zeros(shape, device=device)
        self.correct = torch.zeros(shape, device=device)
        self.seen = 0

    def add(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        """One step's batch of ``len(y)`` examples (per model: ``logits`` (P, B, C), ``loss`` (P,),
        ``y`` (P, B)); ``loss`` is the batch's mean cross-entropy."""
        examples = y.shape[-1]
        self.loss_sum += loss.detach() * examples
        self.correct += (logits.detach().argmax(-1) == y).sum(-1)
        self.seen += examples

    def keep(self, models: list[int]) -> None:
        """Keep only the totals of the models at these indices (the others left the pack)."""
        index = torch.tensor(models, device=self.loss_sum.device)
        self.loss_sum, self.correct = self.loss_sum[index], self.correct[index]

    def means(self, model: int | None = None) -> dict:
        """``train_loss`` and ``train_acc`` of the epoch (of the model at ``model`` in a pack)."""
        loss = self.loss_sum if model is None else self.loss_sum[model]
        correct = self.correct if model is None else self.correct[model]
        return {"train_loss": float(loss) / max(self.seen, 1), "train_acc": float(correct) / max(self.seen, 1)}


def epoch_record(epoch: int, trained: dict, test_acc: float, test_loss: float, held_out: dict, lr: float,
                 seconds: float, extra: dict) -> dict:
    """One epoch's entry of a history, after ``epoch`` (0-based): ``trained`` is ``EpochTotals.means``,
    ``held_out`` the validation metrics (or nothing), ``extra`` the hooks' ``epoch_metrics``."""
    return {"epoch": epoch + 1, **trained, "test_loss": test_loss, "test_acc": test_acc, **held_out,
            "lr": lr, "seconds": seconds} | extra
