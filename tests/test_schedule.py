"""The run's calendar: epochs, and which samples and saves fall due at which step (pure functions)."""

from __future__ import annotations

from types import SimpleNamespace

from lora_offset.training.schedule import Calendar, files_to_remove, sample_due, saves_due, total_steps


def settings(**kw):
    base = dict(save_every_steps=0, save_every_n_epochs=0, save_last_n_steps=0, save_last_n_epochs=0,
                sample_every_steps=0, sample_every_n_epochs=0, sample_at_first=False)
    return SimpleNamespace(**{**base, **kw})


def test_epochs_from_steps_with_and_without_accumulation():
    assert total_steps(None, 3, batches_per_epoch=20, accumulation=1) == 60
    assert total_steps(None, 3, batches_per_epoch=5, accumulation=2) == 8  # ceil(15 / 2)
    assert total_steps(500, None, batches_per_epoch=5, accumulation=2) == 500
    plain = Calendar(max_steps=60, batches_per_epoch=20)
    assert [s for s in range(61) if plain.epoch_ends(s)] == [20, 40, 60]
    assert plain.epochs_completed(39) == 1 and plain.epochs_completed(40) == 2 and plain.num_epochs == 3
    # 5 batches per epoch, 2 per step: epoch 1 ends in step 3 (batches 4-5), epoch 2 in step 5 (batches 8-9).
    accumulating = Calendar(max_steps=8, batches_per_epoch=5, accumulation=2)
    assert [s for s in range(9) if accumulating.epoch_ends(s)] == [3, 5, 8]
    assert [accumulating.epochs_completed(s) for s in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 3]


def test_saves_due_follow_kohya_and_never_duplicate_the_final_file():
    calendar = Calendar(max_steps=6, batches_per_epoch=2)
    t = settings(save_every_steps=2, save_every_n_epochs=1)
    assert {s: saves_due(t, calendar, s) for s in range(1, 7)} == {
        1: [], 2: ["-step000002", "-000001"], 3: [], 4: ["-step000004", "-000002"], 5: [], 6: []}
    assert saves_due(settings(save_every_n_epochs=2), calendar, 4) == ["-000002"]
    assert saves_due(settings(save_every_n_epochs=2), calendar, 2) == []


def test_samples_due_epochs_win_over_steps():
    calendar = Calendar(max_steps=6, batches_per_epoch=2)
    assert [s for s in range(7) if sample_due(settings(sample_every_steps=3), calendar, s)] == [3, 6]
    t = settings(sample_every_steps=3, sample_every_n_epochs=2, sample_at_first=True)
    assert [s for s in range(7) if sample_due(t, calendar, s)] == [0, 4]


def test_files_to_remove_keep_the_last_n(tmp_path):
    names = ["lora-step000001", "lora-step000002", "lora-step000003", "lora-step000004", "lora-000001",
             "lora-000002", "lora-000003", "lora", "lora2-000001", "lora-step000003-copy"]
    for name in names:
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    t = settings(save_every_steps=1, save_last_n_steps=2, save_every_n_epochs=1, save_last_n_epochs=2)
    removed = {p.name for p in files_to_remove(tmp_path, "lora", t, ["-step000004", "-000003"], step=4, epoch=3)}
    # kohya: step files from the last 2 steps stay (step >= 4 - 2), and the last 2 epoch files.
    assert removed == {"lora-step000001.safetensors", "lora-000001.safetensors"}
    assert files_to_remove(tmp_path, "lora", settings(), ["-step000004", "-000003"], step=4, epoch=3) == []
    # Only the kind of file just saved is pruned: no epoch file was written at this step.
    assert {p.name for p in files_to_remove(tmp_path, "lora", t, ["-step000004"], step=4, epoch=3)} == {
        "lora-step000001.safetensors"}
    assert files_to_remove(tmp_path, "lora", t, [], step=4, epoch=3) == []
    # training.ema_save = "both": each file has an -ema twin, which goes with it.
    for name in ("lora-step000001-ema", "lora-step000004-ema", "lora-000001-ema", "lora-000003-ema"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    removed = {p.name for p in files_to_remove(tmp_path, "lora", t, ["-step000004", "-000003"], step=4, epoch=3)}
    assert removed == {"lora-step000001.safetensors", "lora-step000001-ema.safetensors", "lora-000001.safetensors",
                       "lora-000001-ema.safetensors"}
