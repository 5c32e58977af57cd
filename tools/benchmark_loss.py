#!/usr/bin/env python
"""
Forward + backward time and peak extra memory of the vectorised RINCE loss and of rcdet's SupCon
(``MODEL.RCDET.LOSS supcon``, the same kernel), against one plain autograd SupCon pass over the
same inputs and (small case only) the brute-force reference.

    python tools/benchmark_loss.py --json output/bench/loss.json

Also counts, per forward + backward call, the device-to-host syncs and the aten operators
(rcdet.testing.sync_counter), at 20 and 80 classes: they are the same on every device.

Peak extra memory: on CUDA, torch.cuda.max_memory_allocated above the inputs; on the CPU, the
peak resident size of a fresh process that runs one step, above its size before the step
(glibc's mmap threshold fixed, so freed blocks leave the resident set). Prints a table and,
with --json, writes every row plus ``rince_r3_over_supcon`` (time ratio at N=1024, M=8192,
d=128, r=3, against the autograd SupCon) and ``supcon_over_rince_r1`` (rcdet's SupCon against
RINCE-out with r = 1, same size): medians of per-pair ratios of steps run alternately, so that
load from other processes hits both.
"""

import os
import platform
import subprocess
import sys
import time

import torch

from rcdet import cli
from rcdet.engine import exit_on_user_error, report_user_errors
from rcdet.file_io import write_json_atomic
from rcdet.modeling.rince import ranked_info_nce
from rcdet.testing import (
    SyncCounter,
    median_time,
    paired_ratio,
    random_loss_inputs,
    reference_rince,
    ring_rank_matrix,
)


def supcon_autograd(z, y, k, ky, tau, self_index):
    """Plain SupCon (Khosla et al., L_out) with an explicit key set: the usual autograd code."""
    logits = z @ k.t() / tau
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(z)), self_index] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == ky[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    valid = n_pos > 0
    loss = -(log_prob.masked_fill(~pos, 0.0).sum(1)[valid] / n_pos[valid]).mean()
    return loss


def peak_extra_bytes(variant, n, m, r, args, device):
    """Peak memory of one forward + backward above the inputs."""
    if device.type == "cuda":
        step = _make_step(variant, n, m, r, args, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: the peak resident size of a fresh process, which has done nothing else, above its
    # size just before the step (large blocks are mmap'ed, so frees show up in the RSS).
    code = (
        "import sys, torch; sys.argv = sys.argv[:1]; "
        "import benchmark_loss as b; "
        # A tiny warm-up call first, so that loading kernels and thread pools is not counted.
        f"b._make_step({variant!r}, 16, 128, {r}, b._Args({args.dim}, {args.num_classes}),"
        " torch.device('cpu'))(); "
        f"step = b._make_step({variant!r}, {n}, {m}, {r}, b._Args({args.dim}, {args.num_classes}),"
        " torch.device('cpu')); "
        "from rcdet.testing.benchmark import reset_peak_rss, rss_bytes, peak_rss_bytes; "
        "reset_peak_rss(); base = rss_bytes(); step(); print(peak_rss_bytes() - base)"
    )
    # A fixed mmap threshold: glibc otherwise raises it after large frees, serves later blocks
    # from the heap and keeps them resident, which inflates the peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        env=env,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _loss_name(variant):
    return variant if variant.startswith("supcon") else f"rince_{variant}"


class _Args:
    def __init__(self, dim, num_classes):
        self.dim, self.num_classes = dim, num_classes


def _make_step(variant, n, m, r, args, device):
    z, y, k, ky, self_idx = random_loss_inputs(n, m, args.dim, args.num_classes, device)
    z.requires_grad_(True)
    k.requires_grad_(True)
    if variant == "supcon_autograd":
        return lambda: supcon_autograd(z, y, k, ky, 0.1, self_idx).backward()
    ranks = ring_rank_matrix(args.num_classes, r, device)
    taus = [0.1 + 0.1 * i for i in range(r)]
    # As the training step calls it: without the host-side label check.
    return lambda: ranked_info_nce(
        z, y, k, ky, ranks, taus, variant, self_idx, check_inputs=False
    ).loss.backward()


def count_call(variant, n, m, r, dim, num_classes, device):
    """(syncs, operators) of one forward + backward, as the training step calls the loss."""
    z, y, k, ky, self_idx = random_loss_inputs(n, m, dim, num_classes, device)
    z.requires_grad_(True)
    k.requires_grad_(True)
    with SyncCounter() as counter:
        if variant == "supcon_autograd":
            supcon_autograd(z, y, k, ky, 0.1, self_idx).backward()
        else:
            taus = [0.1 + 0.1 * i for i in range(r)]
            ranked_info_nce(
                z,
                y,
                k,
                ky,
                ring_rank_matrix(num_classes, r, device),
                taus,
                variant,
                self_idx,
                check_inputs=False,
            ).loss.backward()
    return counter.syncs, counter.ops


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--device",
        type=cli.device("--device"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the loss runs",
    )
    parser.add_argument("--repeats", type=cli.int_in_range(1), default=5, help="timed calls")
    parser.add_argument(
        "--num-classes", type=cli.int_in_range(2), default=20, help="classes of the labels"
    )
    parser.add_argument("--dim", type=cli.int_in_range(1), default=128, help="embedding size")
    # The first N keys are the anchors, so N <= M.
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=cli.size_pair(ordered=True),
        default=[(512, 4096), (1024, 8192)],
        metavar="NxM",
        help="anchors N x keys M",
    )
    parser.add_argument(
        "--ranks", nargs="+", type=cli.int_in_range(1), default=[1, 2, 3, 4], help="ranks r"
    )
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the memory probes"
    )
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    return report_user_errors(run_benchmark, args)


def run_benchmark(args):
    if args.json:
        cli.check_output_file(args.json, "--json")
    device = torch.device(args.device)
    rows = []

    def run(variant, n, m, r):
        seconds = median_time(_make_step(variant, n, m, r, args, device), device, args.repeats)
        peak = peak_extra_bytes(variant, n, m, r, args, device) if args.memory else 0
        matrix = n * m * 4
        rows.append(
            {
                "loss": _loss_name(variant),
                "N": n,
                "M": m,
                "d": args.dim,
                "r": r,
                "ms": seconds * 1e3,
                "peak_extra_MiB": peak / 2**20,
                "peak_in_NxM_f32": peak / matrix,
            }
        )

    for n, m in args.sizes:
        run("supcon_autograd", n, m, 1)
        run("supcon", n, m, 1)
        for r in args.ranks:
            for variant in ("out_in", "in", "out"):
                run(variant, n, m, r)

    z, y, k, ky, self_idx = random_loss_inputs(16, 64, 16, 5, torch.device("cpu"))
    t = time.perf_counter()
    reference_rince(
        z.tolist(),
        y.tolist(),
        k.tolist(),
        ky.tolist(),
        ring_rank_matrix(5, 3, "cpu").tolist(),
        [0.1, 0.2, 0.3],
        "out_in",
        self_idx.tolist(),
    )
    ref_ms = (time.perf_counter() - t) * 1e3
    zr = z.clone().requires_grad_(True)
    vec_ms = (
        median_time(
            lambda: ranked_info_nce(
                zr, y, k, ky, ring_rank_matrix(5, 3, "cpu"), [0.1, 0.2, 0.3], "out_in", self_idx
            ).loss.backward(),
            torch.device("cpu"),
            args.repeats,
        )
        * 1e3
    )

    print(
        f"device: {device} ({platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    header = ("loss", "N", "M", "r", "fwd+bwd ms", "peak MiB", "x N*M f32")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (16, 5, 5, 2, 11, 9, 9))))
    for row in rows:
        print(
            f"{row['loss']:>16} {row['N']:>5} {row['M']:>5} {row['r']:>2} {row['ms']:>11.1f}"
            f" {row['peak_extra_MiB']:>9.1f} {row['peak_in_NxM_f32']:>9.2f}"
        )
    print(
        f"brute-force reference (N=16, M=64, d=16, r=3, forward only): {ref_ms:.1f} ms; vectorised"
        f" fwd+bwd: {vec_ms:.2f} ms"
    )

    def pick(loss, n, m, r):
        return next(
            (x for x in rows if x["loss"] == loss and x["N"] == n and x["M"] == m and x["r"] == r),
            None,
        )

    summary = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "reference_small_ms": ref_ms,
        "vectorised_small_ms": vec_ms,
    }
    r3, sc = pick("rince_out_in", 1024, 8192, 3), pick("supcon_autograd", 1024, 8192, 1)
    if r3 and sc:
        summary["rince_r3_over_supcon"] = paired_ratio(
            _make_step("out_in", 1024, 8192, 3, args, device),
            _make_step("supcon_autograd", 1024, 8192, 1, args, device),
            device,
            max(args.repeats, 9),
        )
        summary["rince_r3_peak_in_NxM_f32"] = r3["peak_in_NxM_f32"]
        print(
            f"rince_r3_over_supcon (N=1024, M=8192): {summary['rince_r3_over_supcon']:.2f}x time; "
            f"peak extra memory {r3['peak_in_NxM_f32']:.2f} N*M float32 matrices"
        )
    if pick("supcon", 1024, 8192, 1) and pick("rince_out", 1024, 8192, 1):
        summary["supcon_over_rince_r1"] = paired_ratio(
            _make_step("supcon", 1024, 8192, 1, args, device),
            _make_step("out", 1024, 8192, 1, args, device),
            device,
            max(args.repeats, 9),
        )
        print(
            "supcon_over_rince_r1 (N=1024, M=8192): "
            f"{summary['supcon_over_rince_r1']:.2f}x time (rcdet's SupCon / RINCE-out, r = 1)"
        )
    counts = []
    for num_classes in (20, 80):
        for variant, r in [
            ("supcon_autograd", 1),
            ("supcon", 1),
            ("out_in", 1),
            ("out_in", 3),
            ("in", 3),
            ("out", 3),
            ("out_in", 4),
        ]:
            syncs, ops = count_call(variant, 256, 2048, r, args.dim, num_classes, device)
            counts.append(
                {
                    "loss": _loss_name(variant),
                    "r": r,
                    "classes": num_classes,
                    "syncs": syncs,
                    "ops": ops,
                }
            )
    print(
        f"{'loss':>16} {'r':>2} {'classes':>7} {'syncs':>5} {'operators':>9}   (one forward +"
        " backward)"
    )
    for row in counts:
        print(
            f"{row['loss']:>16} {row['r']:>2} {row['classes']:>7} {row['syncs']:>5} {row['ops']:>9}"
        )
    summary["syncs_and_operators"] = counts
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
