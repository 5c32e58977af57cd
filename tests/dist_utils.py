"""Run a function in N CPU processes with a gloo process group (for multi-GPU logic tests)."""

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port


def _entry(rank, world_size, port, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    fn(rank, world_size, *args)
    dist.barrier()
    # Skip interpreter teardown: torch 2.3's ProcessGroupGloo destructor can deadlock joining
    # its worker thread while holding the GIL. Results are already on disk.
    os._exit(0)


def run_distributed(fn, world_size, *args):
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
