"""DenseNet-121 and the TorchXRayVision weights: architectures built without network (random
weights), their files loaded from TorchXRayVision's cache or a local path, trainable
parameters per unfreeze_depth, and the errors an offline machine gets. No test downloads:
TorchXRayVision's cache is a temporary HOME, filled with random weights in its file formats."""

import os
import sys

import pytest
import torch
import torch.nn as nn
from torchvision.models import densenet121

from cxr_ray.config import ExperimentConfig, ModelConfig
from cxr_ray.errors import ConfigError, WeightsError
from cxr_ray.models.backbones import trainable_parameter_names
from cxr_ray.models.registry import build_model
from cxr_ray.models.specs import TXRV_WEIGHTS
from cxr_ray.models.weights import txrv_file

# trainable parameters per unfreeze_depth (head: dropout + 1 logit); depth 4 = all of them, which
# equals TorchXRayVision's published counts (DenseNet-121 6,966,034, ResNet-50 23,538,642) with
# their 18-output classifier swapped for one logit
TRAINABLE = {"densenet121": [1025, 2_161_153, 5_525_249, 6_577_025, 6_948_609],
             "resnet50": [2049, 14_966_785, 22_065_153, 23_284_737, 23_503_809]}
DENSENET_PARTS = {0: set(), 1: {"denseblock4", "norm5"}, 2: {"denseblock4", "norm5", "denseblock3", "transition3"},
                  3: {"denseblock4", "norm5", "denseblock3", "transition3", "denseblock2", "transition2"}}


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_trainable_parameter_counts_per_unfreeze_depth(name):
    for depth, expected in enumerate(TRAINABLE[name]):
        model = build_model(ModelConfig(name=name, weights="none", unfreeze_depth=depth))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected, (name, depth)
        if name == "densenet121" and depth < 4:
            parts = {n.split(".")[1] for n in trainable_parameter_names(model) if n.startswith("features.")}
            assert parts == DENSENET_PARTS[depth]
    model = build_model(ModelConfig(name=name, weights="none")).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1)


@pytest.fixture
def txrv_home(tmp_path, monkeypatch):
    """An empty TorchXRayVision cache (HOME points at a temporary folder)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    return cache


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features before the head, for DenseNet-121 (ours or TorchXRayVision's)."""
    return nn.functional.adaptive_avg_pool2d(torch.relu(model.features(x)), 1).flatten(1)


def test_txrv_densenet_file_loads_from_its_cache_and_from_a_path(txrv_home, tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    ref = xrv.models.DenseNet(weights=None).eval()  # random weights, TorchXRayVision's class
    name = "densenet121-res224-all"
    torch.save(ref, txrv_home / TXRV_WEIGHTS[name].file)  # its release files are pickled models
    ours = build_model(ModelConfig(name="densenet121", weights=f"txrv:{name}", unfreeze_depth=2)).eval()
    x = torch.rand(2, 1, 224, 224) * 2048 - 1024  # its input range
    with torch.no_grad():
        assert torch.allclose(_features(ours, x), ref.features2(x), atol=1e-4)
    local = tmp_path / "copy.pt"
    torch.save(ref.state_dict(), local)  # a state dict at any path works too
    cfg = ModelConfig(name="densenet121", weights=str(local), weights_format=f"txrv:{name}")
    with torch.no_grad():
        assert torch.allclose(_features(build_model(cfg).eval(), x), ref.features2(x), atol=1e-4)
    assert ExperimentConfig(model=cfg).model.weights_format == f"txrv:{name}"


def test_txrv_resnet_state_dict_loads(txrv_home):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    ref = resnet50(num_classes=18)  # TorchXRayVision's ResNet: torchvision's, one-channel conv1
    ref.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    ref.eval()
    torch.save(ref.state_dict(), txrv_home / TXRV_WEIGHTS["resnet50-res512-all"].file)
    ours = build_model(ModelConfig(name="resnet50", weights="txrv:resnet50-res512-all", unfreeze_depth=0)).eval()
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        trunk = nn.Sequential(*list(ref.children())[:-1])
        assert torch.allclose(trunk(x).flatten(1), nn.Sequential(*list(ours.children())[:-1])(x).flatten(1),
                              atol=1e-4)


def test_imagenet_densenet_file_with_old_key_names_loads_summed_over_rgb(tmp_path):
    """torchvision's ImageNet DenseNet files use "norm.1"-style names; conv0 is RGB."""
    torch.manual_seed(0)
    ref = densenet121(weights=None).eval()
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in ref.state_dict().items()
           if not k.endswith("num_batches_tracked")}  # as old as the file
    path = tmp_path / "densenet121-imagenet.pth"
    torch.save(old, path)
    ours = build_model(ModelConfig(name="densenet121", weights=str(path), unfreeze_depth=0)).eval()
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(_features(ours, gray), _features(ref, gray.expand(-1, 3, -1, -1)), atol=1e-4)


def test_offline_machine_is_told_which_file_to_place_where(txrv_home, monkeypatch):
    name = "densenet121-res224-chex"
    expected = os.path.join(str(txrv_home), TXRV_WEIGHTS[name].file)
    with pytest.raises(WeightsError, match="place it at") as e:
        txrv_file(name, download=False)
    assert expected in str(e.value) and TXRV_WEIGHTS[name].url in str(e.value)
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # not installed: refused before any download
    with pytest.raises(WeightsError, match=r"pip install 'cxr-ray\[txrv\]'.*place it at"):
        build_model(ModelConfig(name="densenet121", weights=f"txrv:{name}"))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_files_load_only_as_declared_torchxrayvision_models(tmp_path, monkeypatch, zip_format, capsys):
    """A pickled model is read only when declared a TorchXRayVision file, and only when its
    pickle names nothing but torch / TorchXRayVision module classes and tensor data (read by a
    restricted unpickler, module classes as inert placeholders); in torch's zip format and in the
    legacy one of TorchXRayVision's 2020 release files; also where TorchXRayVision is not installed.
    The attacks are in tests/models/test_pickled.py."""
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    ref = xrv.models.DenseNet(weights=None).eval()
    path = tmp_path / "pickled.pt"
    torch.save(ref, path, _use_new_zipfile_serialization=zip_format)
    declared = {"weights_format": "txrv:densenet121-res224-all"}
    with pytest.raises(WeightsError, match="could run code.*model.weights_format=txrv:NAME"):
        build_model(ModelConfig(name="densenet121", weights=str(path)))
    ours = build_model(ModelConfig(name="densenet121", weights=str(path), **declared)).eval()
    x = torch.rand(1, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        assert torch.allclose(_features(ours, x), ref.features2(x), atol=1e-4)
    evil = tmp_path / "evil.pt"
    torch.save({"features.conv0.weight": torch.zeros(64, 1, 7, 7), "x": _RunsCode()}, evil,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError, match=r"evil.pt refused.*names __builtin__.print"):
        build_model(ModelConfig(name="densenet121", weights=str(evil), **declared))
    assert "this pickle runs code" not in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", None)
    without = build_model(ModelConfig(name="densenet121", weights=str(path), **declared)).eval()
    with torch.no_grad():
        assert torch.allclose(_features(without, x), ref.features2(x), atol=1e-4)


@pytest.mark.parametrize("over, message", [
    ({"model.weights": "txrv:densenet121-res999"}, "unknown TorchXRayVision weights"),
    ({"model.weights": "txrv:densenet121-res224-all"}, "set model.name=densenet121"),
    ({"model.name": "densenet121", "model.weights_format": "txrv:densenet121-res224-all"}, "local weights file"),
    ({"model.weights": "/x.pt", "model.weights_format": "txrv:resnet50-res512-all", "model.name": "densenet121"},
     "is a resnet50"),
    ({"model.name": "densenet121", "model.weights": "txrv:densenet121-res224-all", "data.cache_size": 128},
     "data.cache_size"),
])
def test_bad_weights_settings_are_config_errors(over, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig().replace(**over)


def test_gradcam_reads_densenet_features():
    pytest.importorskip("captum")
    import numpy as np

    from cxr_ray.apps.explain import gradcam
    from cxr_ray.models.registry import gradcam_layer

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="densenet121", weights="none", unfreeze_depth=1)).eval()
    cam = gradcam(model, gradcam_layer(model, "densenet121"), torch.randn(2, 1, 96, 96), np.array([True, False]))
    assert cam.shape == (2, 96, 96) and 0.0 <= cam.min() and cam.max() <= 1.0 and cam.max() > 0
