#!/usr/bin/env python
"""
Overhead of RankedContrastiveROIHeads (RINCE, r = 3, queue 4096; with --branch vos: VOS alone,
active from the first step) over StandardROIHeads on the same model: median train-step time
ratio, inference-time ratio with EMBED_AT_TEST off and on, and peak memory. The two models are
stepped alternately in one run, so machine noise hits both.

    # the CPU demo config; then R50-FPN on a GPU, in float32 and with AMP
    python tools/benchmark_overhead.py --json output/bench/overhead.json
    python tools/benchmark_overhead.py --config-file configs/voc_rince.yaml --synthetic
    python tools/benchmark_overhead.py --config-file configs/voc_rince.yaml --synthetic \\
        --amp float16
    python tools/benchmark_overhead.py --config-file configs/shapes_vos_ood.yaml --branch vos

Without the dataset on disk (or with --synthetic) it uses random images with random boxes.
The optimizer runs with --lr 0 by default: the step is timed, not the training, and a randomly
initialised R50 with frozen BatchNorm diverges at any useful learning rate. It also counts the
device-to-host syncs of one training step of each model (rcdet.testing.sync_counter).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from rcdet import cli
from rcdet.config import add_rcdet_config
from rcdet.engine import USER_ERRORS, check_datasets_exist, exit_on_user_error, report_user_errors
from rcdet.file_io import write_json_atomic
from rcdet.testing import SyncCounter


def build_cfg(config_file, mode, device, opts=()):
    """mode: standard | rince (r = 3, queue 4096) | vos (VOS only, from iteration 0)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_rcdet_config(cfg)
    cli.load_config_file(cfg, config_file)
    cli.merge_overrides(cfg, opts)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    if mode == "standard":
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    elif mode == "vos":
        cfg.MODEL.ROI_HEADS.NAME = "RankedContrastiveROIHeads"
        cfg.MODEL.RCDET.LOSS = "none"
        cfg.MODEL.RCDET.VOS.ENABLED = True
        cfg.MODEL.RCDET.VOS.STARTING_ITER = 0
    else:
        cfg.MODEL.ROI_HEADS.NAME = "RankedContrastiveROIHeads"
        cfg.MODEL.RCDET.LOSS = "rince_out_in"
        cfg.MODEL.RCDET.MAX_RANK = 3
        cfg.MODEL.RCDET.QUEUE_SIZE = 4096
    return cfg


def synthetic_batches(cfg, count, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.INPUT.MIN_SIZE_TEST
    out = []
    for _ in range(count):
        batch = []
        for _ in range(batch_size):
            h, w = size, int(size * 1.2)
            inst = Instances((h, w))
            n = int(torch.randint(1, 7, (1,), generator=g))
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            wh = (0.1 + 0.3 * torch.rand(n, 2, generator=g)) * torch.tensor([w, h])
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
            inst.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (n,), generator=g)
            img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            batch.append({"image": img, "instances": inst, "height": h, "width": w})
        out.append(batch)
    return out


def real_batches(cfg, count):
    from detectron2.data import build_detection_train_loader

    it = iter(build_detection_train_loader(cfg))
    return [next(it) for _ in range(count)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, opt, batch, device, amp=None):
    """
    One step; ``amp``: None or (dtype, GradScaler or None), as detectron2's AMPTrainer does it.
    """
    sync(device)
    t = time.perf_counter()
    with torch.autocast(
        device_type=torch.device(device).type,
        dtype=amp[0] if amp else None,
        enabled=amp is not None,
    ):
        losses = model(batch)
    loss = sum(losses.values())
    scaler = amp[1] if amp else None
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t


def make_amp(name, device):
    if name == "off":
        return None
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    scaler = (
        torch.cuda.amp.GradScaler()
        if device.startswith("cuda") and dtype == torch.float16
        else None
    )
    return dtype, scaler


def count_step_syncs(model, opt, batch, device, amp):
    """Syncs and operators of one step on the static-shape path, the one accelerators take (on
    the CPU the head reads its anchor count back by default, which costs nothing there)."""
    contrast = getattr(model.roi_heads, "contrast", None)
    saved = contrast.static_shapes if contrast is not None else None
    if contrast is not None:
        contrast.static_shapes = True
    try:
        with EventStorage(0), SyncCounter() as counter:
            train_step(model, opt, batch, device, amp)
    finally:
        if contrast is not None:
            contrast.static_shapes = saved
    return counter


@torch.no_grad()
def infer(model, batch, device):
    sync(device)
    t = time.perf_counter()
    model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    sync(device)
    return time.perf_counter() - t


def models_and_data(args):
    cfgs = {
        m: build_cfg(args.config_file, m, args.device, args.opts) for m in ("standard", args.branch)
    }
    torch.manual_seed(0)
    models = {}
    for m, cfg in cfgs.items():
        torch.manual_seed(0)
        models[m] = build_model(cfg)
    cfg = cfgs[args.branch]
    use_real = not args.synthetic and cfg.DATASETS.TRAIN and _dataset_exists(cfg)
    batches = (
        real_batches(cfg, args.batches)
        if use_real
        else synthetic_batches(cfg, args.batches, cfg.SOLVER.IMS_PER_BATCH)
    )
    return cfgs, models, batches, use_real


def _dataset_exists(cfg):
    try:
        check_datasets_exist(cfg)
        return True
    except USER_ERRORS:
        return False


def peak_memory_probe(mode, args):
    """Peak memory above the model and data over a few training steps, in a fresh process (CPU)."""
    if args.device.startswith("cuda"):
        return None
    cmd = (
        [
            sys.executable,
            os.path.abspath(__file__),
            "--probe-memory",
            mode,
            "--branch",
            args.branch,
            "--config-file",
            args.config_file,
            "--batches",
            "3",
            "--device",
            args.device,
            "--lr",
            str(args.lr),
        ]
        + (["--synthetic"] if args.synthetic else [])
        + list(args.opts)
    )
    # A fixed mmap threshold, so freed blocks leave the resident set.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default="configs/shapes_rince.yaml")
    parser.add_argument(
        "--device",
        type=cli.device("--device"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where both models run",
    )
    parser.add_argument(
        "--steps", type=cli.int_in_range(1), default=30, help="timed train steps per model"
    )
    parser.add_argument(
        "--batches", type=cli.int_in_range(1), default=6, help="distinct batches cycled through"
    )
    parser.add_argument("--synthetic", action="store_true", help="random images and boxes")
    parser.add_argument(
        "--lr",
        type=cli.float_in_range(0),
        default=0.0,
        help="SGD learning rate of the timed steps (0: time the step only)",
    )
    parser.add_argument(
        "--amp",
        choices=["off", "float16", "bfloat16"],
        default="off",
        help="autocast the train step (float16 with GradScaler on CUDA)",
    )
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the CPU memory probes"
    )
    parser.add_argument(
        "--branch",
        choices=["rince", "vos"],
        default="rince",
        help="the rcdet head to compare: RINCE (r = 3) or VOS alone, active from iteration 0",
    )
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    return report_user_errors(run, args)


def run(args):
    if args.json:
        cli.check_output_file(args.json, "--json")
    build_cfg(args.config_file, "rince", args.device, args.opts)  # a config mistake fails here
    torch.manual_seed(0)

    if args.probe_memory:
        from rcdet.testing.benchmark import peak_rss_bytes, reset_peak_rss, rss_bytes

        cfgs, models, batches, _ = models_and_data(args)
        model = models[args.probe_memory].train()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        with EventStorage(0):
            train_step(model, opt, batches[0], args.device)  # warm-up: kernels, thread pools
            reset_peak_rss()
            base = rss_bytes()
            for b in batches:
                train_step(model, opt, b, args.device)
        print(peak_rss_bytes() - base)
        return 0

    branch = args.branch
    cfgs, models, batches, use_real = models_and_data(args)
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=args.lr, momentum=0.9) for m in models}
    amp = {m: make_amp(args.amp, args.device) for m in models}
    times = {m: [] for m in models}
    peaks = {m: 0 for m in models}
    with EventStorage(0) as storage:
        for m in models:  # warm-up, and fill the RINCE queue as in steady-state training
            models[m].train()
            for b in batches:
                train_step(models[m], opts[m], b, args.device, amp[m])
        for i in range(args.steps):
            order = ("standard", branch) if i % 2 == 0 else (branch, "standard")
            for m in order:
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                storage.iter = i
                times[m].append(
                    train_step(models[m], opts[m], batches[i % len(batches)], args.device, amp[m])
                )
                if args.device.startswith("cuda"):
                    peaks[m] = max(peaks[m], torch.cuda.max_memory_allocated())
    train_ratio = statistics.median(r / s for r, s in zip(times[branch], times["standard"]))
    syncs = {
        m: count_step_syncs(models[m], opts[m], batches[0], args.device, amp[m]) for m in models
    }
    added = syncs[branch].sync_ops - syncs["standard"].sync_ops

    inf = {"standard": [], "embed_off": [], "embed_on": []}
    for m in models.values():
        m.eval()
    heads = models[branch].roi_heads
    for i in range(args.steps):
        b = batches[i % len(batches)]
        keys = ["standard", "embed_off", "embed_on"]
        for key in keys if i % 2 == 0 else reversed(keys):
            heads.embed_at_test = key == "embed_on"
            inf[key].append(
                infer(models["standard" if key == "standard" else branch], b, args.device)
            )
    heads.embed_at_test = False
    ratio_off = statistics.median(o / s for o, s in zip(inf["embed_off"], inf["standard"]))
    ratio_on = statistics.median(o / s for o, s in zip(inf["embed_on"], inf["standard"]))

    if not args.device.startswith("cuda"):
        peaks = {m: peak_memory_probe(m, args) if args.memory else None for m in models}
    result = {
        "config": args.config_file,
        "branch": branch,
        "device": (
            args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name()
        ),
        "threads": torch.get_num_threads(),
        "data": "built-in dataset" if use_real else "synthetic",
        "images_per_batch": len(batches[0]),
        "steps": args.steps,
        "train_step_ms": {m: 1e3 * statistics.median(t) for m, t in times.items()},
        "train_step_ratio": train_ratio,
        "lr": args.lr,
        "amp": args.amp,
        "syncs_per_step": {m: c.syncs for m, c in syncs.items()},
        "syncs_added_by_rcdet": dict(added),
        "ops_per_step": {m: c.ops for m, c in syncs.items()},
        "inference_ms": {k: 1e3 * statistics.median(v) for k, v in inf.items()},
        "inference_ratio_embed_off": ratio_off,
        "inference_ratio_embed_on": ratio_on,
        "peak_memory_MiB": {m: None if p is None else p / 2**20 for m, p in peaks.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
