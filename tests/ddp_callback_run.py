"""Train with TracInCheckpoint under DDP on two CPU processes, for test_callback.py.

Usage: python ddp_callback_run.py OUT_DIR

Lightning's DDP launcher starts rank 1 by running this script again with the same
arguments. Each rank writes OUT_DIR/saves_rank{N}.json, the list of checkpoint
files it passed to torch.save, so the test can check that only rank 0 wrote.
Set MASTER_ADDR and MASTER_PORT in the environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_lightning import TinyClassifier, make_loader  # noqa: E402

from tracin.callbacks import TracInCheckpoint  # noqa: E402

# 32 examples in batches of 4 split over 2 ranks: 4 optimizer steps per epoch.
N_EXAMPLES = 32
BATCH_SIZE = 4
MAX_EPOCHS = 2
EVERY_N_TRAIN_STEPS = 3


def main(out_dir: Path) -> None:
    checkpoint_dir = out_dir / "tracin"
    saved_files: list[str] = []
    torch_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        if str(f).startswith(str(checkpoint_dir)):
            saved_files.append(Path(f).name)
        return torch_save(obj, f, *args, **kwargs)

    torch.save = recording_save

    pl.seed_everything(0)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=MAX_EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[TracInCheckpoint(checkpoint_dir, every_n_train_steps=EVERY_N_TRAIN_STEPS)],
    )
    trainer.fit(TinyClassifier(scheduler="step"), make_loader(N_EXAMPLES, BATCH_SIZE))

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"saves_rank{trainer.global_rank}.json").write_text(json.dumps(saved_files))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
