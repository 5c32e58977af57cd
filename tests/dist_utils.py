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


def _save_result(rank, world_size, fn, out_dir, *args):
    torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pth"))


def run_workers(fn, world_size, out_dir, *args):
    """
    Run ``fn(rank, world_size, *args)`` in ``world_size`` processes (run_distributed); what each
    returned, by rank, passed back through files in ``out_dir``.
    """
    run_distributed(_save_result, world_size, fn, str(out_dir), *args)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pth")) for r in range(world_size)]
