"""The run's calendar, as pure functions: steps and epochs, and which samples and saves fall due when.

An epoch is one pass over the instance images (repeats included): `batches_per_epoch` global
batches. An optimizer step consumes `gradient_accumulation_steps` batches, so `step` optimizer
steps have completed `(step * accumulation) // batches_per_epoch` epochs; epoch e ends at the
step that consumes its last batch. With one micro-batch per step (the usual case) that is kohya's
epoch exactly; with accumulation kohya ends each epoch with a shorter step, lora-offset keeps every
step whole and lets the next epoch's first batches into it.

Intermediate files (kohya's names and rules): `{name}-step{step:06d}.safetensors` every
`save_every_steps`, `{name}-{epoch:06d}.safetensors` at the end of every `save_every_n_epochs`-th
epoch, neither at the last step (that one is `{name}.safetensors`). `save_last_n_steps` keeps the
step files of the last N steps, `save_last_n_epochs` the last N epoch files; older ones are removed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Calendar:
    max_steps: int
    batches_per_epoch: int
    accumulation: int = 1

    def epochs_completed(self, step: int) -> int:
        """Epochs completed after `step` optimizer steps."""
        return (step * self.accumulation) // self.batches_per_epoch

    def epoch_ends(self, step: int) -> bool:
        """True when optimizer step number `step` (1-based) completes an epoch."""
        return step >= 1 and self.epochs_completed(step) > self.epochs_completed(step - 1)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_steps * self.accumulation / self.batches_per_epoch)


def total_steps(max_steps: int | None, max_train_epochs: int | None, batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps of the run: max_steps, or as many as max_train_epochs take."""
    if max_train_epochs is None:
        return int(max_steps)
    return math.ceil(max_train_epochs * batches_per_epoch / accumulation)


def sample_due(t, calendar: Calendar, step: int) -> bool:
    """Samples after optimizer step `step` (0 = before training: sample_at_first). kohya: epochs win over steps."""
    if step == 0:
        return bool(t.sample_at_first)
    if t.sample_every_n_epochs:
        return calendar.epoch_ends(step) and calendar.epochs_completed(step) % t.sample_every_n_epochs == 0
    return bool(t.sample_every_steps) and step % t.sample_every_steps == 0


def saves_due(t, calendar: Calendar, step: int) -> list[str]:
    """File-name suffixes of the intermediate adapters due after step `step` ("-step000400", "-000002")."""
    if step >= calendar.max_steps:
        return []  # the last step writes {name}.safetensors
    due = []
    if t.save_every_steps and step % t.save_every_steps == 0:
        due.append(f"-step{step:06d}")
    epoch = calendar.epochs_completed(step)
    if t.save_every_n_epochs and calendar.epoch_ends(step) and epoch % t.save_every_n_epochs == 0:
        due.append(f"-{epoch:06d}")
    return due


def files_to_remove(folder: Path, name: str, t, saved: list[str], step: int, epoch: int) -> list[Path]:
    """Intermediate adapters that save_last_n_steps / save_last_n_epochs no longer keep once the files
    `saved` (suffixes from saves_due) are written: step files after a step save, epoch files after an
    epoch save (as kohya removes them)."""
    saved_step = any(s.startswith("-step") for s in saved)
    saved_epoch = any(re.fullmatch(r"-\d{6,}", s) for s in saved)
    old = []
    # training.ema_save = "both" writes an "-ema" twin of each file: it goes with its file.
    step_file = re.compile(re.escape(name) + r"-step(\d{6,})(?:-ema)?\.safetensors")
    epoch_file = re.compile(re.escape(name) + r"-(\d{6,})(?:-ema)?\.safetensors")
    for path in sorted(folder.glob(f"{name}-*.safetensors")):
        if (saved_step and t.save_last_n_steps and (m := step_file.fullmatch(path.name))
                and int(m[1]) < step - t.save_last_n_steps):
            old.append(path)
        elif (saved_epoch and t.save_last_n_epochs and t.save_every_n_epochs and (m := epoch_file.fullmatch(path.name))
              and int(m[1]) <= epoch - t.save_every_n_epochs * t.save_last_n_epochs):
            old.append(path)
    return old
