#!/usr/bin/env python
"""
Train or evaluate a Faster R-CNN with rcdet's ranked contrastive ROI heads.

    python tools/train_net.py --config-file configs/voc_rince.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/shapes_rince.yaml MODEL.DEVICE cpu
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""

from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from rcdet.checkpoint import load_trained_weights
from rcdet.engine import Trainer, exit_on_user_error, setup_cfg


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


def cli_main(args):
    return exit_on_user_error(main, args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        cli_main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
