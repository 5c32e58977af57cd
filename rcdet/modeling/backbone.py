"""A small from-scratch backbone with GroupNorm, so the demo trains on a laptop CPU."""

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError

__all__ = ["TinyConvNet", "build_tinynet_fpn_backbone", "check_tinynet_config"]

STAGES = ("s2", "s3", "s4", "s5")
# detectron2's get_norm("GN", C) is GroupNorm(32, C).
GN_GROUPS = 32


class TinyConvNet(Backbone):
    """
    VGG-style stages at strides 4, 8, 16 and 32 (named s2..s5), each conv followed by norm + ReLU.
    """

    def __init__(
        self, in_channels, channels, depth, norm="GN", out_features=("s2", "s3", "s4", "s5")
    ):
        super().__init__()
        if len(channels) != 4 or len(depth) != 4:
            raise ValueError(
                f"MODEL.TINYNET.CHANNELS and DEPTH need 4 entries, got {channels} and {depth}."
            )

        def conv(cin, cout, stride):
            layer = Conv2d(
                cin, cout, 3, stride=stride, padding=1, bias=not norm, norm=get_norm(norm, cout)
            )
            weight_init.c2_msra_fill(layer)
            return layer

        # The stem brings the input to stride 2; each stage then halves the resolution once.
        self.stem = conv(in_channels, channels[0], 2)
        self.stages = nn.ModuleList()
        self._out_feature_channels, self._out_feature_strides = {}, {}
        cin, stride = channels[0], 2
        for i, (cout, n) in enumerate(zip(channels, depth)):
            stride *= 2
            blocks = [conv(cin, cout, 2)] + [conv(cout, cout, 1) for _ in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            name = f"s{i + 2}"
            self._out_feature_channels[name], self._out_feature_strides[name] = cout, stride
            cin = cout
        self._out_features = list(out_features)

    def forward(self, x):
        outputs = {}
        x = F.relu_(self.stem(x))
        for i, stage in enumerate(self.stages):
            for layer in stage:
                x = F.relu_(layer(x))
            name = f"s{i + 2}"
            if name in self._out_features:
                outputs[name] = x
        return outputs


def check_tinynet_config(cfg):
    """
    The model-shape keys of the TinyNet-FPN backbone fit together: 4 stages, channel counts that
    the norm can group, FPN inputs among the backbone's outputs at consecutive strides, and RPN
    and ROI inputs among the FPN's outputs. One ConfigError naming the keys, before any layer is
    built (instead of a GroupNorm or an FPN assertion error).
    """
    t, fpn = cfg.MODEL.TINYNET, cfg.MODEL.FPN
    for key, values, lo in (("CHANNELS", t.CHANNELS, 1), ("DEPTH", t.DEPTH, 0)):
        if len(values) != len(STAGES) or any(not isinstance(v, int) or v < lo for v in values):
            raise ConfigError(
                f"MODEL.TINYNET.{key} = {list(values)}: one integer >= {lo} per stage"
                f" {', '.join(STAGES)}, {len(STAGES)} in all."
            )
    if t.NORM == "GN" and any(c % GN_GROUPS for c in t.CHANNELS):
        raise ConfigError(
            f"MODEL.TINYNET.CHANNELS = {list(t.CHANNELS)}: with MODEL.TINYNET.NORM GN"
            f" ({GN_GROUPS} groups) each entry must be a multiple of {GN_GROUPS}."
        )
    if fpn.NORM == "GN" and fpn.OUT_CHANNELS % GN_GROUPS:
        raise ConfigError(
            f"MODEL.FPN.OUT_CHANNELS = {fpn.OUT_CHANNELS}: with MODEL.FPN.NORM GN ({GN_GROUPS}"
            f" groups) it must be a multiple of {GN_GROUPS}."
        )
    outs = list(t.OUT_FEATURES)
    if not outs or any(f not in STAGES for f in outs):
        raise ConfigError(f"MODEL.TINYNET.OUT_FEATURES = {outs}: choose among {', '.join(STAGES)}.")
    ins = list(fpn.IN_FEATURES)
    index = [STAGES.index(f) if f in outs else -1 for f in ins]
    if not ins or -1 in index or index != list(range(index[0], index[0] + len(ins))):
        raise ConfigError(
            f"MODEL.FPN.IN_FEATURES = {ins}: consecutive stages in order, among"
            f" MODEL.TINYNET.OUT_FEATURES {outs}."
        )
    # FPN names its outputs after the strides: s3 -> p3, plus p{last + 1} from the max-pool.
    levels = [f"p{i + 2}" for i in index] + [f"p{index[-1] + 3}"]
    for key in ("MODEL.RPN.IN_FEATURES", "MODEL.ROI_HEADS.IN_FEATURES"):
        node = cfg
        for part in key.split("."):
            node = node[part]
        if not node or any(f not in levels for f in node):
            raise ConfigError(
                f"{key} = {list(node)}: choose among the FPN levels {levels} that"
                f" MODEL.FPN.IN_FEATURES {ins} gives."
            )
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    if len(sizes) not in (1, len(cfg.MODEL.RPN.IN_FEATURES)):
        raise ConfigError(
            f"MODEL.ANCHOR_GENERATOR.SIZES has {len(sizes)} entries: one per level of"
            f" MODEL.RPN.IN_FEATURES {list(cfg.MODEL.RPN.IN_FEATURES)}, or one for all."
        )


@BACKBONE_REGISTRY.register()
def build_tinynet_fpn_backbone(cfg, input_shape: ShapeSpec):
    check_tinynet_config(cfg)
    bottom_up = TinyConvNet(
        input_shape.channels,
        cfg.MODEL.TINYNET.CHANNELS,
        cfg.MODEL.TINYNET.DEPTH,
        norm=cfg.MODEL.TINYNET.NORM,
        out_features=cfg.MODEL.TINYNET.OUT_FEATURES,
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
