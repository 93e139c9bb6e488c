"""``build_model(cfg)``: ResNet-50 and DenseNet-121 transfer learning, the from-scratch CNN.

Every model takes one-channel images prepared by the checkpoint's preprocessing contract
(``data.preprocessing``) and returns one logit per image (PNEUMONIA vs NORMAL). Pretrained
weights (ImageNet, TorchXRayVision's chest X-ray models, a local file) come from
``cxr_ray.models.weights``; their classifier is replaced by the project's dropout + one-logit head.

Gray input to RGB weights: feeding a gray image ``g`` replicated to three channels computes
``sum_c W_c * g = (sum_c W_c) * g``, so the first convolution's ImageNet weights are summed
over RGB once at build time. Because the gray image is normalised with one mean/std (zero
padding is zero in every channel), this is exactly equivalent to the replicated 3-channel
input, including at the borders, with a third of the first layer's input work.
TorchXRayVision's models are one-channel already (the sum over one channel is the identity).
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cxr_ray.config import ModelConfig
from cxr_ray.errors import WeightsError
from cxr_ray.models.weights import pretrained_state

log = logging.getLogger(__name__)

# unfreeze_depth -> trainable parts (besides the head), last first; 4 also trains the stem
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1")
STEM = ("conv1", "bn1")
DENSENET_STAGES = (("denseblock4", "norm5"), ("denseblock3", "transition3"), ("denseblock2", "transition2"),
                   ("denseblock1", "transition1"))
DENSENET_STEM = ("conv0", "norm0")


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


# torchvision's ImageNet DenseNet files predate its module names: "norm.1" is now "norm1"
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _load_pretrained(model: nn.Module, cfg: ModelConfig, stem: str, head: str) -> None:
    """Load ``model.weights`` into ``model`` (whose ``stem`` convolution is one-channel), all
    but the ``head`` classifier; RGB stems are summed over RGB (see module doc). A file for
    another architecture is a :class:`WeightsError`."""
    state = pretrained_state(cfg.name, cfg.weights, cfg.weights_format)
    if state is None:
        return
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items() if not k.startswith(f"{head}.")}
    conv = f"{stem}.weight"
    if conv in state and state[conv].ndim == 4 and state[conv].shape[1] == 3:
        state[conv] = state[conv].sum(dim=1, keepdim=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"model.weights {cfg.weights!r} does not fit {cfg.name}: {e}") from e
    # files older than BatchNorm's num_batches_tracked (torchvision's ImageNet DenseNet) lack it
    if unexpected or [k for k in missing if not k.startswith(f"{head}.") and not k.endswith(".num_batches_tracked")]:
        raise WeightsError(f"model.weights {cfg.weights!r} is not a {cfg.name} state dict "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _gray_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A one-channel convolution shaped like ``conv`` (pretrained weights are loaded into it)."""
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)


def _freeze_all_but(parent: nn.Module, trainable: set[str]) -> None:
    """Freeze every child of ``parent`` not named in ``trainable`` (see :func:`_freeze`)."""
    for name in [n for n, _ in parent.named_children()]:
        if name not in trainable:
            _freeze(parent, name)


def build_resnet50(cfg: ModelConfig) -> nn.Module:
    """ResNet-50 with a 1-channel stem, the last ``unfreeze_depth`` stages trainable, and a
    dropout + linear head to one logit. Frozen stages keep their BatchNorm statistics."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.conv1 = _gray_stem(model.conv1)
    _load_pretrained(model, cfg, stem="conv1", head="fc")
    trainable = set(RESNET_STAGES[: cfg.unfreeze_depth]) | (set(STEM) if cfg.unfreeze_depth >= 4 else set())
    _freeze_all_but(model, trainable)  # (fc too: it is replaced by the head below)
    model.fc = nn.Sequential(nn.Dropout(cfg.dropout), LogitLinear(model.fc.in_features, 1))
    return model


class DenseNet121(nn.Module):
    """torchvision's DenseNet-121 with a 1-channel stem, the last ``unfreeze_depth`` dense
    blocks trainable (with their transitions; 1 adds the final norm, 4 the stem) and a
    dropout + linear head to one logit. TorchXRayVision's DenseNet-121 files load into it
    (same module names); so do torchvision's ImageNet weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from torchvision.models import densenet121

        net = densenet121(weights=None)
        self.features = net.features
        self.features.conv0 = _gray_stem(self.features.conv0)
        _load_pretrained(self, cfg, stem="features.conv0", head="classifier")
        trainable = {n for stage in DENSENET_STAGES[: cfg.unfreeze_depth] for n in stage}
        _freeze_all_but(self.features, trainable | (set(DENSENET_STEM) if cfg.unfreeze_depth >= 4 else set()))
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), LogitLinear(net.classifier.in_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


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


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that receive gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
