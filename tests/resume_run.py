"""Trace a fixed tiny run; with --kill-at N, SIGKILL this process during the N-th batch's loss call.

Used by test_resume.py to interrupt a trace at a known point and resume it.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyMLP, digits_dataset, save_checkpoints  # noqa: E402

from tracin import trace_self_influence  # noqa: E402


class KillingLoss:
    """Cross-entropy that kills the process on its N-th call, in the middle of a batch."""

    name = "cross_entropy"

    def __init__(self, kill_at: int | None):
        self.kill_at = kill_at
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits, targets, reduction="none"), logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--order", choices=["batch", "checkpoint"], default="batch",
                        help="outer loop of the passes; checkpoint turns off the weight cache")
    args = parser.parse_args()
    if args.order == "checkpoint":
        import tracin.passes

        tracin.passes.WEIGHT_CACHE_BYTES = -1

    torch.manual_seed(0)
    model = TinyMLP()
    checkpoints = sorted(args.directory.glob("step=*.pt"))
    if not checkpoints:
        checkpoints = save_checkpoints(model, args.directory, [0.1, 0.05, 0.01])
    trace_self_influence(model, checkpoints, digits_dataset(200), args.out,
                         loss=KillingLoss(args.kill_at), batch_size=args.batch_size)


if __name__ == "__main__":
    main()
