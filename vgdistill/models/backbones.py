"""Image backbones: torchvision ResNet (DETR style, frozen BatchNorm), Swin, and a tiny CNN.

Every backbone maps [B,3,S,S] to a [B,C,h,w] feature map with `num_channels` channels and an
overall stride of `stride`. Weights come from a torchvision weight name (downloaded by
torchvision where a network exists) or a local .pth/.safetensors file with torchvision's
key names.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from vgdistill.errors import VGError

log = logging.getLogger("vgdistill")

RESNETS = ("resnet50", "resnet101")
SWINS = ("swin_t", "swin_s", "swin_b")
BACKBONES = (*RESNETS, *SWINS, "tiny_cnn")
# Keys of a torchvision classifier that a feature extractor does not have.
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CoordConv(nn.Module):
    """3x3 conv + BN + ReLU whose input also gets two channels holding the x and y position.

    TransVG adds position embeddings to attention queries and keys only, so the [REG] token
    can only read coordinates that the features themselves carry; a large pretrained CNN
    learns that from padding, a tiny one trained for minutes needs it spelt out.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin + 2, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,cout,H/stride,W/stride]."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
        coords = torch.cat([xs.expand(b, 1, h, w), ys.expand(b, 1, h, w)], dim=1)
        x = torch.cat([x, coords.to(memory_format=torch.contiguous_format)], dim=1)
        return torch.relu(self.bn(self.conv(x)))


class TinyCNN(nn.Sequential):
    """Four conv layers, overall stride 8, 128 channels: the CPU demo's backbone."""

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                stem=CoordConv(3, 32, 2),
                layer1=_conv_bn_relu(32, 64, 2),
                layer2=_conv_bn_relu(64, 128, 2),
                layer3=CoordConv(128, 128, 1),
            )
        )


class Backbone(nn.Module):
    """A feature extractor: `body` holds the weights, named as in the torchvision model."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise VGError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
        import torchvision
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.name = name
        self.channels_last = False
        if name in RESNETS:
            # DETR/TransVG: BatchNorm statistics and affine terms are frozen, and the stem
            # and layer1 are not trained (only layer2..layer4 receive gradients).
            net = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
            parts = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            self.body = nn.Sequential(OrderedDict((p, getattr(net, p)) for p in parts))
            for pname, p in self.body.named_parameters():
                if not pname.startswith(("layer2", "layer3", "layer4")):
                    p.requires_grad_(False)
            self.num_channels, self.stride = 2048, 32
        elif name in SWINS:
            net = getattr(torchvision.models, name)(weights=None)
            self.body = nn.Sequential(OrderedDict(features=net.features, norm=net.norm))
            self.num_channels = net.head.in_features
            self.stride = 32
        else:
            # For 64-pixel images on a CPU: stride 8 gives an 8x8 grid of visual tokens.
            self.body = TinyCNN()
            self.num_channels, self.stride = 128, 8

    @property
    def is_cnn(self) -> bool:
        """True for convolutional backbones (they benefit from channels_last)."""
        return self.name not in SWINS

    def feature_size(self, image_size: int) -> int:
        """Side of the feature grid for a square input of `image_size` pixels."""
        if self.name in SWINS:
            # 4x4 patch embedding (floor), then three 2x patch mergings that pad odd sizes.
            s = image_size // 4
            for _ in range(3):
                s = math.ceil(s / 2)
            return s
        # Every stride-2 layer (conv, max-pool) maps s to ceil(s / 2).
        s = image_size
        for _ in range(int(math.log2(self.stride))):
            s = math.ceil(s / 2)
        return s

    def set_channels_last(self, enabled: bool) -> None:
        """Use the channels_last memory format (faster convolutions on GPUs) for CNNs."""
        enabled = enabled and self.is_cnn
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.body.to(memory_format=fmt)
        self.channels_last = enabled

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] -> [B,C,h,w]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.name in SWINS:
            # torchvision Swin works channels-last ([B,H,W,C]) inside.
            return self.body(x).permute(0, 3, 1, 2)
        return self.body(x)

    def load_weights(self, spec: str) -> None:
        """Load a torchvision weight name (e.g. IMAGENET1K_V1) or a local .pth/.safetensors."""
        from vgdistill.models.files import load_state_file

        if not spec:
            return
        path = Path(spec).expanduser()
        looks_like_file = path.suffix in (".pth", ".pt", ".bin", ".safetensors") or "/" in spec
        if looks_like_file or path.is_file():
            state = load_state_file(path)
            source = str(path)
        else:
            state = self._torchvision_weights(spec)
            source = f"torchvision {self.name} {spec}"
        self.load_state(state, source)

    def _torchvision_weights(self, tag: str) -> dict[str, Tensor]:
        import torchvision

        if self.name == "tiny_cnn":
            raise VGError(
                "model.backbone_weights: tiny_cnn has no torchvision weights; "
                "use '' or a local file"
            )
        enum = torchvision.models.get_model_weights(self.name)
        names = [w.name for w in enum] + ["DEFAULT"]
        if tag not in names:
            raise VGError(
                f"model.backbone_weights: {tag!r} is neither a file nor a torchvision weight "
                f"name for {self.name} (choose from {', '.join(names)})"
            )
        try:
            return enum[tag].get_state_dict(progress=True)
        except Exception as e:  # network or cache failure: say how to work offline
            raise VGError(
                f"could not download torchvision {self.name} weights {tag} ({type(e).__name__}: "
                f"{e}); put the file on disk and set model.backbone_weights to its path"
            ) from None

    def load_state(self, state: dict[str, Tensor], source: str) -> None:
        """Load torchvision-named tensors into the body; report what did not match."""
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith(_CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")
        }
        own = self.body.state_dict()
        shape_bad = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if shape_bad:
            raise VGError(
                f"{source}: weights do not fit backbone {self.name}: {'; '.join(shape_bad[:3])}"
            )
        keep_bn_count = {k for k in own if k.endswith("num_batches_tracked")}
        result = self.body.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in keep_bn_count]
        if len(missing) == len(own) - len(keep_bn_count):
            raise VGError(f"{source}: no weights for backbone {self.name} found in the file")
        if missing or result.unexpected_keys:
            log.warning(
                "backbone weights %s: %d missing (%s), %d unexpected (%s)",
                source,
                len(missing),
                ", ".join(missing[:5]),
                len(result.unexpected_keys),
                ", ".join(result.unexpected_keys[:5]),
            )
        else:
            log.info("backbone %s: loaded %d tensors from %s", self.name, len(state), source)
