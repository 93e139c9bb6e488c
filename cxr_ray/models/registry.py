"""One entry per model: how it is built, where Grad-CAM reads it, which settings it ignores.

Adding a model: its builder in ``models/backbones.py``, an :class:`Entry` here, its name in
``models/specs.py`` (``MODEL_NAMES``, with the pretrained weights it accepts), and ImageNet
weights in ``models/weights.py`` if torchvision has them. Everything else (checkpoints,
ensembles, Grad-CAM, export, scoring) finds the model through this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from cxr_ray.config import ModelConfig
from cxr_ray.errors import ConfigError, ExplainError
from cxr_ray.models.backbones import DenseNet121, SimpleCNN, build_resnet50
from cxr_ray.models.specs import MODEL_NAMES


@dataclass(frozen=True)
class Entry:
    """A model: ``build(cfg)`` gives ``(B, 1)`` logits; ``gradcam_layer(model)`` is the layer
    Grad-CAM reads (the last convolutional stage); ``ignores`` are the config keys it does not
    read (hidden where members of an ensemble are listed)."""

    build: Callable[[ModelConfig], nn.Module]
    gradcam_layer: Callable[[nn.Module], nn.Module]
    ignores: tuple[str, ...] = ()


def _last_conv(model: nn.Module) -> nn.Module:
    return [m for m in model.features.modules() if isinstance(m, nn.Conv2d)][-1]


REGISTRY: dict[str, Entry] = {
    # ResNet-50's last stage
    "resnet50": Entry(build_resnet50, lambda m: m.layer4, ignores=("model.width",)),
    # DenseNet-121's features: after its last dense block and norm
    "densenet121": Entry(DenseNet121, lambda m: m.features, ignores=("model.width",)),
    # the scratch CNN's last convolution
    "simple_cnn": Entry(lambda cfg: SimpleCNN(cfg.width, cfg.dropout), _last_conv,
                        ignores=("model.unfreeze_depth", "model.weights")),
}
assert tuple(REGISTRY) == MODEL_NAMES, "models/specs.py MODEL_NAMES and the registry must list the same models"


def entry(name: str) -> Entry:
    """The registry entry of model ``name``; a :class:`ConfigError` listing the models otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"model.name: unknown model {name!r}; choices: {list(REGISTRY)}")
    return REGISTRY[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.name``, built by its entry; outputs ``(B, 1)`` logits."""
    return entry(cfg.name).build(cfg)


def gradcam_layer(model: nn.Module, name: str) -> nn.Module:
    """The layer Grad-CAM reads in ``model`` (a model named ``name``)."""
    if name not in REGISTRY:
        raise ExplainError(f"no Grad-CAM layer known for model {name!r}")
    return REGISTRY[name].gradcam_layer(model)


def ignored_settings(name: str | None) -> tuple[str, ...]:
    """The config keys model ``name`` does not read (none for an unknown name)."""
    return REGISTRY[name].ignores if name in REGISTRY else ()
