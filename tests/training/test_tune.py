"""Ray Tune: bad search spaces are refused before any trial. The search itself (trials.csv,
best/, the test report, resume after a killed driver) runs end to end in test_demo.py (local
storage, the README's command) and test_object_storage.py (on S3, with a resume)."""

import pytest

from cxr_ray.config import ExperimentConfig
from cxr_ray.errors import ConfigError
from cxr_ray.training.tune import validate_search_space


def _space(**space):
    return ExperimentConfig().replace(**{"tune.search_space": space})


@pytest.mark.parametrize("space, message", [
    ({"model.dropot": {"type": "uniform", "low": 0, "high": 0.5}}, "unknown parameter"),
    ({"model.dropout": {"type": "uniform", "low": 0.5, "high": 0.1}}, "impossible range"),
    ({"model.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, "value 1.5 is impossible"),
    ({"model.unfreeze_depth": {"type": "choice", "values": [1, 7]}}, "value 7 is impossible"),
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}, "loguniform needs low > 0"),
    ({"train.lr": {"type": "gaussian"}}, "expected a mapping with type"),
    ({"data.image_size": {"type": "choice", "values": [64, 128]}}, "data settings cannot be searched"),
    ({"data.val_fraction": {"type": "uniform", "low": 0.1, "high": 0.2}}, "one cache prepared"),
    ({"train.epochs": {"type": "choice", "values": [3, 6]}}, "ASHA decides how many epochs"),
])
def test_bad_search_space_is_refused_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_search_space(_space(**space))


def test_unreported_metric_is_refused():
    with pytest.raises(ConfigError, match="no trial reports 'val_recall'"):
        validate_search_space(ExperimentConfig().replace(**{"tune.metric": "val_recall"}))


def test_default_space_is_valid():
    validate_search_space(ExperimentConfig())


BACKBONES = {"model": {"type": "choice", "values": [
    {"name": "resnet50", "weights": "imagenet"},
    {"name": "densenet121", "weights": "txrv:densenet121-res224-all", "unfreeze_depth": 2},
    {"name": "resnet50", "weights": "txrv:resnet50-res512-all"}]}}


def test_backbones_are_one_joint_choice_sharing_one_cache():
    from cxr_ray.data.preprocessing import resolve_preprocessing
    from cxr_ray.training.tune import param_space, trial_overrides, with_shared_cache_size

    cfg = _space(**BACKBONES)
    validate_search_space(cfg)
    labels = param_space(cfg)["model"].categories  # plain strings: every searcher samples those
    assert labels[1] == "name=densenet121, weights=txrv:densenet121-res224-all, unfreeze_depth=2"
    shared = with_shared_cache_size(cfg)
    assert shared.data.cache_size == 512  # the 512 px TorchXRayVision ResNet's size
    trial = shared.replace(**trial_overrides(shared, {"model": labels[1]}))
    assert (trial.model.name, trial.model.weights, trial.model.unfreeze_depth) == (
        "densenet121", "txrv:densenet121-res224-all", 2)
    contract = resolve_preprocessing(trial)
    assert (contract.cache_size, contract.image_size, contract.value_range) == (512, 224, (-1024.0, 1024.0))
    same = _space(**{"model.weights": {"type": "choice", "values": ["imagenet", "none"]}})
    assert with_shared_cache_size(same) is same  # one size: nothing to share


@pytest.mark.parametrize("space, message", [
    ({"model.name": {"type": "choice", "values": ["resnet50", "densenet121"]},
      "model.weights": {"type": "choice", "values": ["imagenet", "txrv:densenet121-res224-all"]}},
     "impossible.*one choice of model settings"),
    ({"model": {"type": "choice", "values": [{"name": "densenet121", "weights": "txrv:resnet50-res512-all"}]}},
     "is impossible: model.weights: txrv:resnet50-res512-all is a resnet50"),
    ({"model": {"type": "uniform", "low": 0, "high": 1}}, "list of mappings"),
])
def test_impossible_backbone_searches_are_refused(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_search_space(_space(**space))
