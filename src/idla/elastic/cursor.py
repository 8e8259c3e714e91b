"""The data cursor of an elastic run, as arithmetic: where step N is, and which steps were done.

Every epoch has the same number of global batches (`GlobalBatchSampler.steps_per_epoch`), and
each committed step moves the cursor by one global batch, so the cursor after `steps` steps from
(epoch, batch) is one `divmod`, whatever `steps` is: adopting a state many steps ahead costs
O(1), not a loop over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def advance_cursor(epoch: int, batch: int, steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """The (epoch, batch) `steps` global batches after (epoch, batch). O(1).

    Raises:
        ValueError: `steps_per_epoch` is not positive, or the result would be before (0, 0).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    index = epoch * steps_per_epoch + batch + steps
    if index < 0:
        raise ValueError(f"cursor ({epoch}, {batch}) moved by {steps} steps is before (0, 0)")
    epoch_after, batch_after = divmod(index, steps_per_epoch)
    return epoch_after, batch_after


def samples_before(epoch: int, batch: int, dataset_size: int, global_batch_size: int) -> int:
    """Samples trained before cursor (epoch, batch): every epoch holds the whole dataset and
    every batch of an epoch but its last is full. O(1)."""
    return epoch * dataset_size + min(batch * global_batch_size, dataset_size)


@dataclass
class CommitLog:
    """The global batches of every committed step, in order, as runs of consecutive ones.

    A batch is named by its global index ``epoch * steps_per_epoch + batch``. Memory and the
    cost of `extend` and `truncate` grow with the number of runs (one per interruption), not
    with the number of steps.
    """

    runs: list[tuple[int, int]] = field(default_factory=list)
    """(first global index, count) of each run of consecutive batches."""

    def __len__(self) -> int:
        return sum(count for _, count in self.runs)

    @property
    def end(self) -> int:
        """The global index after the last recorded step (0 when empty)."""
        return sum(self.runs[-1]) if self.runs else 0

    def extend(self, first: int, count: int = 1) -> None:
        """Record `count` steps at global batches first, first + 1, ..."""
        if count <= 0:
            return
        if self.runs and sum(self.runs[-1]) == first:
            start, length = self.runs[-1]
            self.runs[-1] = (start, length + count)
        else:
            self.runs.append((first, count))

    def truncate(self, length: int) -> None:
        """Forget every step after the first `length` (steps of a claim that was refused)."""
        kept: list[tuple[int, int]] = []
        for start, count in self.runs:
            if length <= 0:
                break
            kept.append((start, min(count, length)))
            length -= count
        self.runs = kept

    def cursors(self, steps_per_epoch: int) -> list[tuple[int, int]]:
        """(epoch, batch) of every step, in order (O(steps): for reports and tests)."""
        return [divmod(index, steps_per_epoch)
                for start, count in self.runs for index in range(start, start + count)]
