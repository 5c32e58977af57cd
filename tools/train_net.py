#!/usr/bin/env python
"""
Train or evaluate a Faster R-CNN with rcdet's ranked contrastive ROI heads.

    python tools/train_net.py --config-file configs/voc_rince.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/shapes_rince.yaml MODEL.DEVICE cpu
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth

Tool options go before the KEY VALUE config overrides. Training saves OUTPUT_DIR/config.yaml;
--eval-only keeps it and logs to OUTPUT_DIR/eval/ instead.
"""

from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from rcdet import cli
from rcdet.checkpoint import load_trained_weights
from rcdet.engine import Trainer, exit_on_user_error, setup_cfg


def argument_parser():
    """detectron2's default_argument_parser, with the ranges of its numbers checked and shown."""
    parser = cli.ArgumentParser(
        description=__doc__, parents=[default_argument_parser()], add_help=False
    )
    # The parent's actions are shared: give them their types here.
    actions = {a.dest: a for a in parser._actions}
    actions["num_gpus"].type = cli.int_in_range(0)
    actions["num_machines"].type = cli.int_in_range(1)
    actions["machine_rank"].type = cli.int_in_range(0)
    return parser


def setup(args):
    return setup_cfg(args.config_file, args.opts, args)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_trained_weights(model, cfg, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_launch(args):
    """The config and the GPUs, checked once in this process before the workers start: an error
    is then one line, not one per worker and a traceback of the launcher."""
    if args.machine_rank >= args.num_machines:
        raise cli.UsageError(
            f"--machine-rank {args.machine_rank}: machines are numbered 0 to"
            f" {args.num_machines - 1} (--num-machines {args.num_machines})."
        )
    cfg = setup_cfg(args.config_file, args.opts, task="eval" if args.eval_only else "train")
    cli.check_gpu_count(args.num_gpus, "--num-gpus", cfg.MODEL.DEVICE)
    world = max(args.num_gpus, 1) * args.num_machines
    if not args.eval_only and cfg.SOLVER.IMS_PER_BATCH % world:
        raise cli.UsageError(
            f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is split over {world} processes"
            f" (--num-gpus x --num-machines): set it to a multiple of {world}."
        )


def cli_main(args):
    return exit_on_user_error(main, args)


def command_line(argv=None):
    """What ``python tools/train_net.py ARGS`` runs: parse, check once, launch the workers."""
    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    exit_on_user_error(check_launch, args)
    return launch(
        cli_main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    command_line()
