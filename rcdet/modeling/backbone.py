"""A small from-scratch backbone with GroupNorm, so the demo trains on a laptop CPU."""

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn
from torch.nn import functional as F

__all__ = ["TinyConvNet", "build_tinynet_fpn_backbone"]


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


@BACKBONE_REGISTRY.register()
def build_tinynet_fpn_backbone(cfg, input_shape: ShapeSpec):
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
