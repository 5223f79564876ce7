"""Data-parallel training of LeNet-BN with DistributedDataParallel and batchnorm's SyncBatchNorm.

    torchrun --nproc_per_node 2 examples/ddp_train.py --steps 200                  # gloo, CPU
    torchrun --nproc_per_node 4 examples/ddp_train.py --device cuda --steps 200    # NCCL, a GPU per rank
    python examples/ddp_train.py --steps 200                                       # one process

Every step draws one global batch of ``--global-batch`` samples (the same on every rank, from a
seeded generator) and each rank trains on its shard (``torch.tensor_split``: shard sizes differ
by at most one, and a rank may get none). SyncBatchNorm normalizes with the statistics of the
whole global batch, and the loss is scaled so that DDP's gradient average is the gradient of the
mean loss over the global batch; so N processes compute what one process computes on the
concatenated batch, up to float rounding. Rank 0 prints progress and, with ``--out``, saves the
final state dict (SyncBatchNorm's keys are BatchNorm's).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchnorm import SyncBatchNorm
from batchnorm.experiments.data import Dataset, load_digits, resize, synthetic_digits
from batchnorm.experiments.models import lenet


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=64, help="samples per step over all ranks")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="save the final state dict here (rank 0)")
    return parser.parse_args(argv)


def build_model(seed: int) -> nn.Module:
    """The report's LeNet-BN with SyncBatchNorm layers, initialized from ``seed`` (identical on every rank)."""
    torch.manual_seed(seed)
    return SyncBatchNorm.convert_sync_batchnorm(lenet(bn=True))


def load_data(name: str, seed: int) -> Dataset:
    """The demo's digits resized to 28x28, or 512 synthetic 28x28 images (instant, for tests)."""
    if name == "synthetic":
        return synthetic_digits(512, seed)
    data = load_digits(seed)
    return Dataset(
        data.name, resize(data.train_images, 28), data.train_labels, resize(data.test_images, 28), data.test_labels
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # set by torchrun
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        data = load_data(args.data, args.seed)
        x_train, y_train, x_test, y_test = data.train_images, data.train_labels, data.test_images, data.test_labels
        model = build_model(args.seed).to(device)
        ddp: nn.Module = (
            DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            if (distributed)
            else model
        )
        optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
        sampler = torch.Generator().manual_seed(args.seed + 1)
        for step in range(args.steps):
            index = torch.randint(len(y_train), (args.global_batch,), generator=sampler)  # (B,), same on every rank
            shard = torch.tensor_split(index, world)[rank]  # this rank's (B_rank,) of the global batch
            xb, yb = x_train[shard].to(device), y_train[shard].to(device)
            # sum over the shard * world / B: DDP averages over ranks, giving the mean over the global batch.
            loss = F.cross_entropy(ddp(xb), yb, reduction="sum") * (world / args.global_batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == args.steps - 1:
                global_loss = loss.detach() / world
                if distributed:
                    dist.all_reduce(global_loss)  # () summed over ranks: the global mean loss
                if rank == 0:
                    print(f"step {step:5d}  loss {global_loss.item():.4f}", flush=True)
        if rank == 0:
            model.eval()
            with torch.no_grad():
                correct = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
            print(f"test accuracy {correct:.4f} ({world} process{'es' if world > 1 else ''})", flush=True)
            if args.out:
                # Written under a temporary name and renamed, so that a crash leaves no half file.
                tmp = f"{args.out}.tmp"
                torch.save({key: value.cpu() for key, value in model.state_dict().items()}, tmp)
                os.replace(tmp, args.out)
        if distributed:
            # Every rank leaves together: tearing gloo down while rank 0 still evaluates and
            # saves can abort the process ("terminate called without an active exception").
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
