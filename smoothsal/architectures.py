"""The registry of supported architectures: name → builder of a randomly initialised model.

Builders return the library's own network with one exception, made so that attributions are the
model's true gradients: MONAI's ResNet encoder (inside ``unet_resnet34``) builds its stride-2
"type A" shortcuts as ``cat([pooled.data, zeros])``, and the ``.data`` cuts every gradient through
them. :class:`ZeroPadShortcut` computes the same values without detaching; it has no parameters,
so state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .errors import BadOption

__all__ = ["ARCHITECTURES", "ZeroPadShortcut", "attach_shortcuts"]


class ZeroPadShortcut(nn.Module):
    """A parameter-free shortcut: keep every ``stride``-th pixel, pad the channels with zeros to
    ``planes`` (ResNet "type A"); the same values as MONAI's, with gradients."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes = planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x[:, :, :: self.stride, :: self.stride]
        pad = kept.new_zeros(kept.shape[0], self.planes - kept.shape[1], *kept.shape[2:])
        return torch.cat([kept, pad], dim=1)

    def extra_repr(self) -> str:
        return f"planes={self.planes}, stride={self.stride}"


def attach_shortcuts(model: nn.Module) -> nn.Module:
    """Replace, in place, each MONAI type-A shortcut of ``model`` by a :class:`ZeroPadShortcut`;
    returns ``model``. A model without such shortcuts is returned as it was."""
    from monai.networks.nets.resnet import ResNet

    for block in model.modules():
        down = getattr(block, "downsample", None)
        if (
            isinstance(down, partial)
            and getattr(down.func, "__func__", None) is ResNet._downsample_basic_block
        ):
            if down.keywords.get("spatial_dims", 2) != 2:
                raise BadOption("only 2-d models are supported; fix the model's spatial_dims")
            block.downsample = ZeroPadShortcut(down.keywords["planes"], down.keywords["stride"])
    return model


def _torchvision_resnet(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kw) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kw)

    return build


def _monai_fc_resnet18(num_classes: int = 1, **kw) -> nn.Module:
    """The network of MONAI's pathology_tumor_detection bundle (Camelyon16, one tumour logit)."""
    from monai.networks.nets import TorchVisionFCModel

    kw = {"use_conv": True, "pretrained": False, **kw}
    return TorchVisionFCModel("resnet18", num_classes=num_classes, **kw)


def _unet_resnet34(num_classes: int, in_channels: int = 3, **kw) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    kw = {"pretrained": False, "spatial_dims": 2, **kw}
    unet = FlexibleUNet(in_channels=in_channels, out_channels=num_classes, backbone="resnet34", **kw)
    return attach_shortcuts(unet)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "resnet50": _torchvision_resnet("resnet50"),
    "monai_fc_resnet18": _monai_fc_resnet18,
    "unet_resnet34": _unet_resnet34,
}
