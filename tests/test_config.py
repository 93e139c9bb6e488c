
import pytest
from helpers import ROOT

from cxr_ray.config import ExperimentConfig, load_config, parse_override, valid_keys
from cxr_ray.errors import ConfigError


def test_defaults_round_trip_through_dict():
    cfg = ExperimentConfig()
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: simple_cnn\ntrain:\n  epochs: 3\n")
    cfg = load_config(f, ["data.image_size=128", "train.lr=0.001", "model.weights=none"])
    assert cfg.model.name == "simple_cnn" and cfg.train.epochs == 3
    assert cfg.data.image_size == 128 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.weights == "none"
    assert cfg.data.val_fraction == 0.1  # untouched default


def test_int_is_accepted_for_float_but_not_the_reverse():
    warmup = load_config(None, ["train.warmup_epochs=2"]).train.warmup_epochs
    assert warmup == 2.0 and isinstance(warmup, float)
    with pytest.raises(ConfigError, match="train.epochs: expected an int"):
        load_config(None, ["train.epochs=2.5"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.imagesize=3"])
    assert "data.image_size" in str(e.value) and "data.imagesize" in str(e.value)


def test_unknown_yaml_key_names_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*train.epoch"):
        load_config(f)


@pytest.mark.parametrize("override, field", [
    ("model.name=vgg", "model.name"), ("model.unfreeze_depth=5", "model.unfreeze_depth"),
    ("model.dropout=1.5", "model.dropout"), ("data.val_split=random", "data.val_split"),
    ("train.lr=2", "train.lr"), ("metric.min_specificity=1.0", "metric.min_specificity"),
    ("data.cache_size=64", "data.cache_size"), ("train.use_gpu=maybe", "train.use_gpu"),
    ("score.backend=tensorrt", "score.backend"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_parse_override_requires_equals():
    assert parse_override("a.b=1") == ("a.b", 1)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("data.image_size")


def test_issue_keys_exist():
    keys = set(valid_keys())
    for k in ["model.name", "model.weights", "model.unfreeze_depth", "model.dropout", "data.image_size",
              "train.epochs", "train.batch_size", "train.lr", "train.num_workers", "train.use_gpu",
              "train.patience", "metric.min_specificity"]:
        assert k in keys


def test_string_fields_stay_strings():
    assert load_config(None, ["data.root=123"]).data.root == "123"


def test_onnxruntime_backend_refuses_settings_it_cannot_honour():
    assert load_config(None, ["score.backend=onnxruntime"]).score.amp == "auto"
    for override, field in (("score.amp=bf16", "score.amp"), ("score.compile=true", "score.compile")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*onnxruntime"):
            load_config(None, ["score.backend=onnxruntime", override])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    from cxr_ray.data.preprocessing import resolve_preprocessing
    from cxr_ray.training.tune import model_variants, validate_search_space

    cfg = load_config(path)
    assert resolve_preprocessing(cfg).image_size >= 16  # no download: only names are resolved
    validate_search_space(cfg)  # every trial the search can sample is a valid config
    assert all(resolve_preprocessing(v).image_size >= 16 for v in model_variants(cfg))
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, "each shipped config says what it is for"
    # the command in its comment is one this project has, with this very file
    assert f"--config configs/{path.name}" in path.read_text()


def test_docs_config_md_is_generated_from_config_py():
    """docs/config.md lists every key with its type, default and comment, as config.py has them."""
    from cxr_ray.config import config_reference

    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc == config_reference(), "docs/config.md is out of date: python -m cxr_ray.config > docs/config.md"
    for key in valid_keys():
        assert f"| `{key}` |" in doc, key
