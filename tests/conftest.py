"""Shared test set-up: one torch thread, and every file a run writes kept in pytest's tmp dir."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_run_files(tmp_path, monkeypatch):
    """SB3 makes ``$TMPDIR/SB3-*`` per ``learn()`` and W&B writes under ``~/.cache``: keep both in tmp_path."""
    for var in ("TMPDIR", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
