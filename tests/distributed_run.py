"""Trace a fixed tiny run with several processes through tracin.distributed.

Lightning's script launcher runs this file again for every extra process, so it
must not create anything that a rerun would change: the test writes the
checkpoints first. With --fail-at I or --kill-at I, the process that loads
train example I raises an error or kills itself with SIGKILL.
"""

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyMLP, digits_dataset  # noqa: E402

from tracin.distributed import trace_self_influence_distributed  # noqa: E402

N_EXAMPLES = 200
BATCH_SIZE = 16


class FaultyDataset(torch.utils.data.Dataset):
    """The digits dataset, with a fault injected when one example is loaded."""

    def __init__(self, fail_at: int | None, kill_at: int | None):
        self.data = digits_dataset(N_EXAMPLES)
        self.fail_at = fail_at
        self.kill_at = kill_at

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index == self.fail_at:
            raise ValueError(f"injected failure at train example {index}")
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[index]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--fail-at", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    trace_self_influence_distributed(
        TinyMLP(),
        sorted(args.checkpoint_dir.glob("step=*.pt")),
        FaultyDataset(args.fail_at, args.kill_at),
        args.out,
        accelerator="cpu",
        devices=args.devices,
        timeout_s=args.timeout,
        batch_size=BATCH_SIZE,
        dtype=torch.float64,
    )


if __name__ == "__main__":
    main()
