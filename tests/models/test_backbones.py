import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet50

from cxr_ray.config import ModelConfig
from cxr_ray.errors import WeightsError
from cxr_ray.models.backbones import trainable_parameter_names
from cxr_ray.models.registry import build_model

EXPECTED = {0: {"fc"}, 1: {"fc", "layer4"}, 2: {"fc", "layer4", "layer3"},
            3: {"fc", "layer4", "layer3", "layer2"},
            4: {"fc", "layer4", "layer3", "layer2", "layer1", "conv1", "bn1"}}


@pytest.mark.parametrize("depth", range(5))
def test_unfreeze_depth_selects_trainable_stages(depth):
    model = build_model(ModelConfig(weights="none", unfreeze_depth=depth))
    assert {n.split(".")[0] for n in trainable_parameter_names(model)} == EXPECTED[depth]


def test_frozen_batchnorm_statistics_do_not_move():
    model = build_model(ModelConfig(weights="none", unfreeze_depth=1))
    before = {k: v.clone() for k, v in model.state_dict().items() if "layer3" in k and "running" in k}
    after_l4 = {k: v.clone() for k, v in model.state_dict().items() if "layer4" in k and "running_mean" in k}
    model.train()
    model(torch.randn(4, 1, 64, 64) * 3 + 1)
    state = model.state_dict()
    assert before and all(torch.equal(state[k], v) for k, v in before.items())
    assert any(not torch.equal(state[k], v) for k, v in after_l4.items())  # trainable BN updates


def test_frozen_batchnorm_keeps_bf16_activations_bf16():
    """Under bf16 autocast a frozen stage must not promote its activations back to fp32 (it
    halved the bf16 speed-up of training ResNet-50 on CPU); in fp32 it equals torchvision's."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from cxr_ray.models.backbones import FrozenBatchNorm

    torch.manual_seed(0)
    ours, ref = FrozenBatchNorm(8), FrozenBatchNorm2d(8)
    for m in (ours, ref):
        m.load_state_dict({"weight": torch.rand(8) + 0.5, "bias": torch.randn(8), "running_mean": torch.randn(8),
                           "running_var": torch.rand(8) + 0.1} if m is ours else ours.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert ours(x.bfloat16()).dtype == torch.bfloat16 and ref(x.bfloat16()).dtype == torch.float32
    model = build_model(ModelConfig(weights="none", unfreeze_depth=1)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.layer3(model.layer2(torch.randn(1, 256, 8, 8))).dtype == torch.bfloat16


def test_head_is_dropout_and_one_logit():
    model = build_model(ModelConfig(weights="none", dropout=0.4))
    assert isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.4
    assert model.fc[1].out_features == 1
    assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 1)


def test_summed_conv1_equals_replicated_gray_input(tmp_path):
    ref = resnet50(weights=None).eval()
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    ours = build_model(ModelConfig(weights=str(path), unfreeze_depth=0)).eval()
    gray = torch.randn(2, 1, 64, 64)
    trunk = nn.Sequential(*list(ref.children())[:-1])
    ours_trunk = nn.Sequential(*list(ours.children())[:-1])
    assert torch.allclose(trunk(gray.expand(-1, 3, -1, -1)), ours_trunk(gray), atol=1e-4)


def test_local_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="not an existing"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.pth")))
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="not a resnet50 state dict"):
        build_model(ModelConfig(weights=str(bad)))


def test_simple_cnn_trains_everything():
    model = build_model(ModelConfig(name="simple_cnn", width=8))
    assert all(p.requires_grad for p in model.parameters())
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 1)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match=r"resnet50.*simple_cnn"):
        ModelConfig(name="vgg16")
