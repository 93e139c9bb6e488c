"""Ray Tune: bad search spaces are refused before any trial. The search itself (trials.csv,
best/, the test report, resume after a killed driver) runs end to end in test_demo.py (local
storage, the README's command) and test_object_storage.py (on S3, with a resume)."""

import pytest

from cxr_ray.config import ConfigError, ExperimentConfig
from cxr_ray.tune import validate_search_space


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
