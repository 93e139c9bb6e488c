"""``build_model(cfg)``: ResNet-50 transfer learning and the from-scratch CNN baseline.

Both models take one-channel images normalised by ``data.transforms.normalize`` and return
one logit per image (PNEUMONIA vs NORMAL).

ResNet-50 gray input: ImageNet weights expect RGB. Feeding a gray image ``g`` replicated to
three channels computes ``sum_c W_c * g = (sum_c W_c) * g``, so conv1's weights are summed
over RGB once at build time. Because the gray image is normalised with one mean/std
(zero padding is zero in every channel), this is exactly equivalent to the replicated
3-channel input, including at the borders, with a third of the first layer's input work.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cxr_ray.config import MODEL_NAMES, ModelConfig

log = logging.getLogger(__name__)

# unfreeze_depth -> trainable ResNet parts (besides the head). 4 includes the stem.
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1")
STEM = ("conv1", "bn1")


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; says how to pass a local file."""


def _load_resnet50_state(weights: str) -> dict[str, torch.Tensor] | None:
    """ImageNet state dict (torchvision download/cache), a local file's, or None."""
    from torchvision.models import ResNet50_Weights

    if weights == "none":
        return None
    if weights == "imagenet":
        w = ResNet50_Weights.IMAGENET1K_V2
        try:
            return w.get_state_dict(progress=False)
        except Exception as e:  # URLError, HTTPError, SSL errors...: all mean "no download"
            raise WeightsError(
                f"could not load torchvision's ImageNet ResNet-50 weights ({w.url}): {e}. Put the "
                f"file in torch's cache ({torch.hub.get_dir()}/checkpoints/) or pass a local file "
                f"with --set model.weights=/path/to/resnet50.pth, or use model.weights=none."
            ) from e
    if not os.path.isfile(weights):
        raise WeightsError(f"model.weights: {weights!r} is neither 'imagenet', 'none' nor an existing file")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


class LogitLinear(nn.Linear):
    """The classifier's last layer, always in fp32 (also under bf16 autocast): bf16 logits
    carry ~3 significant digits, which ties validation probabilities, coarsens the selection
    score and the chosen threshold. Costs one small fp32 matmul; the same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` computed in the input's dtype: under bf16 autocast
    its fp32 buffers would otherwise turn every frozen block's activations back into fp32
    (``x * scale + bias`` promotes), and each following convolution would cast them again.
    Identical in fp32; the same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + bias.to(x.dtype).reshape(1, -1, 1, 1)


def _frozen_bn(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm(bn.num_features, eps=bn.eps)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    return frozen


def _freeze(parent: nn.Module, name: str) -> None:
    """Freeze ``parent.name``: no gradients, BatchNorm statistics fixed (FrozenBatchNorm2d)."""
    part = getattr(parent, name)
    if isinstance(part, nn.BatchNorm2d):
        setattr(parent, name, _frozen_bn(part))
        return
    for p in part.parameters(recurse=False):
        p.requires_grad_(False)
    for child in [n for n, _ in part.named_children()]:
        _freeze(part, child)


def build_resnet50(cfg: ModelConfig) -> nn.Module:
    """ResNet-50 with a 1-channel stem, the last ``unfreeze_depth`` stages trainable, and a
    dropout + linear head to one logit. Frozen stages keep their BatchNorm statistics."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    state = _load_resnet50_state(cfg.weights)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise WeightsError(f"model.weights {cfg.weights!r} is not a ResNet-50 state dict "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    rgb = model.conv1.weight.data
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.conv1.weight.data.copy_(rgb.sum(dim=1, keepdim=True))
    trainable = set(RESNET_STAGES[: cfg.unfreeze_depth]) | (set(STEM) if cfg.unfreeze_depth >= 4 else set())
    for name in (*STEM, *RESNET_STAGES):
        if name not in trainable:
            _freeze(model, name)
    model.fc = nn.Sequential(nn.Dropout(cfg.dropout), LogitLinear(model.fc.in_features, 1))
    return model


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SimpleCNN(nn.Module):
    """The from-scratch baseline: four conv blocks (width, 2w, 4w, 8w), global average pool,
    dropout and one logit. ~1.2M parameters at width 32."""

    def __init__(self, width: int = 32, dropout: float = 0.3):
        super().__init__()
        chans = [1, width, width * 2, width * 4, width * 8]
        self.features = nn.Sequential(*[_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  LogitLinear(chans[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.name`` (see ``MODEL_NAMES``); outputs ``(B, 1)`` logits."""
    if cfg.name == "resnet50":
        return build_resnet50(cfg)
    if cfg.name == "simple_cnn":
        return SimpleCNN(cfg.width, cfg.dropout)
    raise ValueError(f"model.name: unknown model {cfg.name!r}; choices: {list(MODEL_NAMES)}")


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that receive gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
