"""Training set-up on a real local Ray, before any worker starts: resources, splits, run folders."""

import pandas as pd
import pytest
from helpers import write_image

from cxr_ray.config import ExperimentConfig
from cxr_ray.data.cache import prepare_cache
from cxr_ray.errors import ConfigError, DataError
from cxr_ray.training.train import check_resources, check_run_dir, resolve_resources, training_inputs


def test_auto_cpus_give_a_local_run_the_whole_machine(ray_local):
    cfg = ExperimentConfig()  # train.cpus_per_worker = 0: auto
    assert resolve_resources(cfg).train.cpus_per_worker == 1.5  # 2 CPUs, 0.5 left to Ray Data
    two = cfg.replace(**{"train.num_workers": 2})
    assert resolve_resources(two).train.cpus_per_worker == 0.75
    # a trial's worker: 1 CPU where it fits beside tune.data_cpus (1.0); on these 2 CPUs, 0.75
    assert resolve_resources(cfg, for_tune=True).train.cpus_per_worker == 0.75
    from cxr_ray.training.tune import max_concurrent_trials

    assert max_concurrent_trials(resolve_resources(cfg, for_tune=True)) == 1  # the default tune starts here
    roomy = cfg.replace(**{"tune.data_cpus": 0.5})
    assert resolve_resources(roomy, for_tune=True).train.cpus_per_worker == 1.0
    assert resolve_resources(cfg.replace(**{"train.cpus_per_worker": 0.4})).train.cpus_per_worker == 0.4


def test_use_gpu_auto_is_resolved_for_the_cluster_and_never_read_unresolved(ray_local):
    from cxr_ray.training.train import resolve_gpu, uses_gpu

    cfg = ExperimentConfig()
    assert cfg.train.use_gpu == "auto"
    assert resolve_resources(cfg).train.use_gpu == "false"  # this cluster has no GPU: CPU, no error
    with pytest.raises(AssertionError, match="must be resolved"):
        uses_gpu(cfg)
    forced = cfg.replace(**{"train.use_gpu": True})  # true/false as before: YAML booleans still work
    assert forced.train.use_gpu == "true" and resolve_gpu(forced).train.use_gpu == "true"
    with pytest.raises(ConfigError, match="needs 1 GPUs; the cluster has 0"):
        check_resources(resolve_resources(forced), data_cpus=0.5)


def test_one_class_validation_split_is_refused_before_training(ray_local, tmp_path):
    rows = []
    for i in range(6):
        rows.append((write_image(tmp_path / f"IM-{i:04d}-0001.png", 16, 50 + i), "NORMAL", "train"))
        rows.append((write_image(tmp_path / f"person{i}_virus_1.png", 16, 150 + i), "PNEUMONIA", "train"))
    for i in range(6, 9):
        rows.append((write_image(tmp_path / f"person{i}_virus_1.png", 16, 150 + i), "PNEUMONIA", "val"))
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp_path / "m.csv", index=False)
    cfg = ExperimentConfig().replace(**{"data.root": str(tmp_path / "m.csv"), "data.val_split": "official",
                                        "data.image_size": 16, "data.cache_dir": str(tmp_path / "c")})
    with pytest.raises(DataError, match=r"the val split .* NORMAL=0, PNEUMONIA=3 .*both classes"):
        training_inputs(cfg, prepare_cache(cfg))


def test_existing_run_folder_needs_resume(tmp_path):
    cfg = ExperimentConfig().replace(**{"train.name": "r", "train.storage_path": str(tmp_path)})
    check_run_dir(cfg, str(tmp_path / "r"), resume=False)  # new: fine
    (tmp_path / "r").mkdir()
    cfg.to_yaml(tmp_path / "r" / "config.yaml")
    with pytest.raises(ConfigError, match="already exists.*cxr-ray train --resume"):
        check_run_dir(cfg, str(tmp_path / "r"), resume=False)
    check_run_dir(cfg.replace(**{"train.cpus_per_worker": 3.0}), str(tmp_path / "r"), resume=True)  # scale may change
    # a run saved with use_gpu resolved ("false") resumes under a --config that leaves it at "auto"
    cfg.replace(**{"train.use_gpu": False}).to_yaml(tmp_path / "r" / "config.yaml")
    check_run_dir(cfg, str(tmp_path / "r"), resume=True)
    with pytest.raises(ConfigError, match=r"differs .* in train.lr: 0.0003 -> 0.001"):
        check_run_dir(cfg.replace(**{"train.lr": 1e-3}), str(tmp_path / "r"), resume=True)
    with pytest.raises(ConfigError, match="not a cxr-ray training run"):
        check_run_dir(cfg, str(tmp_path / "nope"), resume=True)
