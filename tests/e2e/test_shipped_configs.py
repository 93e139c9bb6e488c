"""Every shipped config, started with the command its own comment shows, on tiny synthetic data.

The command line is taken from the config file (``# cxr-ray train --config configs/X.yaml --data
...``), its ``--data`` pointed at a small synthetic dataset, and only what this 2-CPU machine
without GPUs or ImageNet downloads needs is overridden: one epoch, 32 px, no pretrained weights,
``train.use_gpu=auto`` and automatic CPUs (and one trial for the searches). The rest of each file
(model, unfreeze depth, dropout, batch size, augmentation, splits, search space) is what runs.
All of them share one local Ray (conftest's ``ray_local``): ``cxr-ray``'s ``main`` leaves a
caller's Ray session up.
``tune_cpu.yaml`` is started by the two-node test (:data:`STARTED_ELSEWHERE`).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

pytestmark = pytest.mark.slow

# configs another end-to-end test starts, as its subject's setting (here they would run twice)
STARTED_ELSEWHERE = {"tune_cpu.yaml": "tests/e2e/test_two_nodes.py"}  # submitted to a 2-node cluster
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name not in STARTED_ELSEWHERE)
TINY = ["data.image_size=32", "train.epochs=1", "model.weights=none", "train.use_gpu=auto",
        "train.cpus_per_worker=0", "metric.tta="]


def shipped_command(path: Path) -> list[str]:
    """The ``cxr-ray ...`` command in the config's comment, as argv without ``cxr-ray``."""
    lines = [ln[2:] for ln in path.read_text().splitlines() if ln.startswith("# cxr-ray ")]
    assert len(lines) == 1, f"{path.name}: one '# cxr-ray ...' command line expected, found {lines}"
    return shlex.split(lines[0])[1:]


@pytest.mark.parametrize("name", sorted(STARTED_ELSEWHERE))
def test_the_other_configs_are_started_by_their_tests(name):
    assert (ROOT / "configs" / name).is_file()
    assert f'"--config", "configs/{name}"' in (ROOT / STARTED_ELSEWHERE[name]).read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_starts_and_trains(path, ray_local, synthetic_root, tmp_path, capsys):
    from cxr_ray.cli import main

    argv = shipped_command(path)
    assert argv[argv.index("--config") + 1] == f"configs/{path.name}"
    argv[argv.index("--config") + 1] = str(path)
    argv[argv.index("--data") + 1] = str(synthetic_root)
    over = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"train.storage_path={tmp_path / 'runs'}"]
    if argv[0] == "tune":
        over += ["tune.num_samples=1"]
        argv += ["--ensemble-top-k", "0"]
    rc = main([*argv, *(a for o in over for a in ("--set", o))])
    out, err = capsys.readouterr()
    assert rc == 0, err[-4000:]
    assert ray_local.is_initialized()  # the caller's session is still up
    best = Path(out.strip().splitlines()[-1])
    assert best.name == "best" and (best / "model.pt").is_file(), out[-2000:]
    shipped = yaml.safe_load(path.read_text())
    trained = yaml.safe_load((best / "config.yaml").read_text())
    searched = set((shipped.get("tune") or {}).get("search_space") or {})  # a trial's own values
    overridden = {o.split("=")[0] for o in over} | searched | {"train.use_gpu"}
    for section in ("model", "train", "augment", "data"):  # the file's own settings were the ones trained
        for key, value in (shipped.get(section) or {}).items():
            if f"{section}.{key}" not in overridden and section not in searched:
                assert trained[section][key] == value, (section, key)
