"""The cxr-ray command as a user runs it."""


import pytest
from helpers import run_cli as cxr_ray


@pytest.mark.slow
def test_make_synthetic_then_inspect(tmp_path):
    out = tmp_path / "syn"
    r = cxr_ray("make-synthetic", str(out), "--n", "60", "--size", "48")
    assert r.returncode == 0 and "SYNTHETIC" in r.stdout
    assert len(list(out.glob("*/*/*.jpeg"))) >= 60
    (out / "train" / "NORMAL" / "IM-7777-0001.jpeg").write_bytes(b"")
    r = cxr_ray("inspect", "--data", str(out), "--cache", str(tmp_path / "c"), "--size", "32",
                "--set", "data.max_bad_fraction=0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NORMAL" in r.stdout and "patients" in r.stdout
    assert "unreadable:" in r.stdout and "IM-7777-0001.jpeg: empty file" in r.stdout
    r = cxr_ray("prepare", "--data", str(out), "--cache", str(tmp_path / "c"), "--size", "32",
                "--set", "data.max_bad_fraction=0.1")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "c"))


@pytest.mark.parametrize("args, message", [
    (["inspect", "--data", "/nonexistent/cxr"], "/nonexistent/cxr' does not exist"),
    (["prepare", "--data", ".", "--set", "model.nam=x"], "unknown config key 'model.nam'"),
    (["train", "--data", ".", "--set", "model.name=vgg"], "model.name: expected one of"),
    (["evaluate", "--checkpoint", "/nonexistent/ck", "--out", "/tmp/x"], "not a cxr_ray checkpoint"),
    (["score", "--checkpoint", "/nonexistent/ck", "--input", ".", "--output", "/tmp/x"], "not a cxr_ray checkpoint"),
    (["score", "--checkpoint", ".", "--input", ".", "--output", "/tmp/x", "--set", "score.num_actors=0"],
     "score.num_actors: expected an int >= 1"),
])
def test_bad_input_fails_fast_with_named_cause(args, message):
    r = cxr_ray(*args)
    assert r.returncode == 2 and message in r.stderr
    assert "Ray at " not in r.stderr  # failed before Ray started


@pytest.mark.slow
def test_score_refuses_bad_output_before_ray(tmp_path):
    from cxr_ray.checkpoint import save_checkpoint
    from cxr_ray.config import ExperimentConfig
    from cxr_ray.models.registry import build_model

    cfg = ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.width": 4, "model.weights": "none"})
    ckpt = save_checkpoint(tmp_path / "ck", build_model(cfg.model), cfg, 0.5, {}, 0)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpeg").write_bytes(b"")
    (tmp_path / "out.parquet").write_bytes(b"x")
    base = ["score", "--checkpoint", str(ckpt), "--input", str(tmp_path / "imgs")]
    r = cxr_ray(*base, "--output", str(tmp_path / "out.parquet"))
    assert r.returncode == 2 and "out.parquet' is a file" in r.stderr
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "part-x-00000.parquet").write_bytes(b"x")
    r = cxr_ray(*base, "--output", str(tmp_path / "old"))
    assert r.returncode == 2 and "pass --resume" in r.stderr
    assert "Ray at " not in r.stderr


def test_version_and_the_resolved_config_round_trip(tmp_path):
    import yaml

    import cxr_ray as package
    from cxr_ray.config import ExperimentConfig, load_config

    r = cxr_ray("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"cxr-ray {package.__version__}"
    r = cxr_ray("config", "--set", "train.epochs=8", "--set", "model.name=simple_cnn")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["epochs"] == 8 and printed["model"]["name"] == "simple_cnn"
    assert set(printed) == set(ExperimentConfig().to_dict())  # every section, every default
    (tmp_path / "my.yaml").write_text(r.stdout)
    assert load_config(str(tmp_path / "my.yaml")) == load_config(None, ["train.epochs=8", "model.name=simple_cnn"])
    again = cxr_ray("config", "--config", str(tmp_path / "my.yaml"))
    assert again.returncode == 0 and again.stdout == r.stdout


@pytest.mark.parametrize("args, refused", [
    (["score", "--checkpoint", ".", "--input", ".", "--out", "/tmp/x", "--set", "data.image_size=128"],
     "--set data.image_size: not read by score (score applies the checkpoint's own model and preprocessing"),
    (["evaluate", "--checkpoint", ".", "--out", "/tmp/x", "--set", "model.dropout=0.1"],
     "--set model.dropout: not read by evaluate (evaluate uses the checkpoint's own config"),
    (["train", "--data", ".", "--set", "tune.num_samples=4", "--set", "score.num_actors=2"],
     "--set tune.num_samples, score.num_actors: not read by train"),
    (["audit", "--data", ".", "--set", "model.name=simple_cnn"], "--set model.name: not read by audit"),
])
def test_a_set_key_the_command_ignores_is_refused_with_the_reason(args, refused):
    r = cxr_ray(*args)
    assert r.returncode == 2 and refused in r.stderr, r.stderr
    assert "Ray at " not in r.stderr


def test_flag_spellings_shared_across_commands(tmp_path):
    """score's output flag is --out like every command's (--output still works); make-synthetic's
    image side is --image-size (--size still works); every --help has a description and an example."""
    from cxr_ray.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["score", "--checkpoint", "c", "--input", "i", "--out", "o"]).out == "o"
    assert parser.parse_args(["score", "--checkpoint", "c", "--input", "i", "--output", "o"]).out == "o"
    assert parser.parse_args(["make-synthetic", "d", "--image-size", "48"]).image_size == 48
    assert parser.parse_args(["make-synthetic", "d", "--size", "48"]).image_size == 48
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = command.format_help()
        example = text.split("example:\n  ", 1)[-1]
        assert command.description and "example:" in text and f"cxr-ray {name}" in example, name
        if any("--out" in a.option_strings for a in command._actions):
            assert not any("--output" == a.option_strings[0] for a in command._actions), name
