#!/usr/bin/env python
"""
Export a trained rcdet model to TorchScript, by scripting or by tracing, and check the export
against the eager model on a test image.

    python tools/export_model.py --config-file configs/shapes_rince.yaml --export-method tracing \\
        --output output/export MODEL.WEIGHTS output/shapes_rince/model_final.pth \\
        MODEL.RCDET.EMBED_AT_TEST True

- ``scripting`` (``detectron2.export.scripting_with_instances``): the whole model, with Python
  control flow; it outputs boxes, scores and classes. The contrastive branch is training-only,
  so ``MODEL.RCDET.EMBED_AT_TEST`` must be off.
- ``tracing`` (``detectron2.export.TracingAdapter``): with ``EMBED_AT_TEST`` on, each detection
  also carries ``pred_logits`` (all classes + background) and ``pred_embeddings`` and, from a
  model whose OOD scorer is fitted (the model_ood.pth of tools/benchmark_ood.py, or the
  model_final.pth of a training with held-out classes), ``ood_scores`` (MODEL.RCDET.OOD.SCORE)
  and ``is_unknown``. The outputs are a flat tuple of tensors: ``outputs_schema.txt`` next to
  ``model.ts`` lists them in order.

The export is run on one image of ``DATASETS.TEST`` (a second image of another size checks
that the trace does not hard-code sizes) and compared with the eager model.
"""

import os
import sys

import torch
from detectron2.data import build_detection_test_loader
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.logger import setup_logger

from rcdet import cli
from rcdet.checkpoint import load_trained_weights
from rcdet.config import ConfigError
from rcdet.engine import exit_on_user_error, report_user_errors, setup_cfg

__all__ = ["export_scripting", "export_tracing", "sample_images"]

SCRIPT_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": torch.Tensor,
    "pred_boxes": Boxes,
    "scores": torch.Tensor,
    "pred_classes": torch.Tensor,
}


def export_scripting(model):
    check_scriptable(model.roi_heads.embed_at_test)
    return scripting_with_instances(model, SCRIPT_FIELDS)


def check_scriptable(embed_at_test: bool):
    if embed_at_test:
        raise ConfigError(
            "--export-method scripting exports boxes, scores and classes only: set"
            " MODEL.RCDET.EMBED_AT_TEST False, or use --export-method tracing to export logits and"
            " embeddings too."
        )


def export_tracing(model, sample):
    """
    (traced module, adapter); the adapter's ``outputs_schema`` turns the flat outputs back into
    Instances.
    """
    image = [{"image": sample["image"]}]
    adapter = TracingAdapter(
        model, image, lambda m, inputs: m.inference(inputs, do_postprocess=False)
    )
    traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    return traced, adapter


def _instances_fields(inst):
    return {k: v.tensor if isinstance(v, Boxes) else v for k, v in inst.get_fields().items()}


def _check(eager, exported, images, method, adapter):
    """Largest absolute difference between eager and exported outputs over the sample images."""
    worst = 0.0
    with torch.no_grad():
        for image in images:
            ref = _instances_fields(eager.inference([{"image": image}], do_postprocess=False)[0])
            if method == "tracing":
                got = _instances_fields(adapter.outputs_schema(exported(image))[0])
            else:
                got = _instances_fields(
                    exported.inference([{"image": image}], do_postprocess=False)[0]
                )
            for key, value in ref.items():
                if key not in got or got[key].shape != value.shape:
                    raise RuntimeError(
                        f"export check: '{key}' differs in shape: {tuple(value.shape)} vs"
                        f" {tuple(got[key].shape) if key in got else 'missing'}"
                    )
                if value.numel():
                    worst = max(worst, float((value.float() - got[key].float()).abs().max()))
    return worst


def check_test_set(cfg):
    if not cfg.DATASETS.TEST:
        raise ConfigError(
            "DATASETS.TEST is empty: the export is checked on test images; name a registered test"
            " set."
        )


def sample_images(cfg, count=2):
    """``count`` images of DATASETS.TEST of different sizes, as the model's input tensors."""
    check_test_set(cfg)
    images, sizes = [], set()
    for batch in build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]):
        image = batch[0]["image"]
        if tuple(image.shape) not in sizes:
            sizes.add(tuple(image.shape))
            images.append(image)
        if len(images) == count:
            break
    return images


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--export-method", choices=["scripting", "tracing"], default="tracing")
    parser.add_argument("--output", default="output/export", help="folder for model.ts")
    parser.add_config_overrides()
    args = parser.parse_args(argv)
    setup_logger(name="rcdet")
    return report_user_errors(run, args)


def run(args):
    cfg = setup_cfg(args.config_file, args.opts)
    cli.check_output_dir(args.output, "--output")
    if args.export_method == "scripting":
        check_scriptable(cfg.MODEL.RCDET.EMBED_AT_TEST)
    check_test_set(cfg)
    model = build_model(cfg).eval()
    load_trained_weights(model, cfg)
    images = sample_images(cfg)
    if args.export_method == "scripting":
        exported, adapter = export_scripting(model), None
    else:
        exported, adapter = export_tracing(model, {"image": images[0]})
    worst = _check(model, exported, images, args.export_method, adapter)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "model.ts")
    exported.save(path)
    if adapter is not None:
        with open(os.path.join(args.output, "outputs_schema.txt"), "w") as f:
            f.write(f"{adapter.outputs_schema}\n")
    print(
        f"[export] {args.export_method}: {path}; checked on {len(images)} image sizes against the"
        f" eager model, max abs difference {worst:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
