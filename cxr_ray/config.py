"""One typed, validated configuration object for every cxr_ray job.

The CLI or a YAML file becomes one :class:`ExperimentConfig` at the entry point. It is
validated before Ray starts, written next to every run, sent to Ray workers as
``cfg.to_dict()`` and rebuilt there with :meth:`ExperimentConfig.from_dict`, and stored in
every checkpoint so inference rebuilds the exact preprocessing used in training.

Unknown keys and bad values raise :class:`ConfigError` naming the key, what was expected
and what was found.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from cxr_ray.errors import ConfigError
from cxr_ray.models.specs import MODEL_NAMES, check_spec, pretrained_info


def parse_tta_modes(text: str, key: str = "metric.tta") -> tuple[str, ...]:
    """``"hflip,crop5"`` -> ``("hflip", "crop5")``; ``""`` / ``"none"`` -> ``()``; an unknown mode
    is a :class:`ConfigError` naming ``key``."""
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip() and m.strip() != "none"))
    bad = [m for m in modes if m not in TTA_MODES]
    if bad:
        raise ConfigError(f"{key}: unknown TTA mode(s) {bad}; expected a comma-separated subset of "
                          f"{[m for m in TTA_MODES if m != 'none']}")
    return modes


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _check_location(value: str, key: str) -> None:
    """A folder or URI setting: ``s3:/b/x`` (one slash) and ``?query`` options are refused, the
    first is a mangled URI, the second is dropped from the paths Ray hands back."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/[^/]", value) and not re.match(r"^[A-Za-z]:[/\\]", value):
        raise ConfigError(f"{key}: {value!r} looks like a URI with one slash; write scheme://bucket/path")
    if "://" in value and "?" in value:
        raise ConfigError(f"{key}: {value!r}: URI query options are not carried through Ray's "
                          f"checkpoints and results; set storage.endpoint_url (or AWS_ENDPOINT_URL) instead")


NORMALIZATIONS = ("auto", "fixed", "per_image")
PRECISIONS = ("auto", "bf16", "fp32")  # train.amp, score.amp (engine/precision.py)
SCORE_DECODES = ("auto", "cpu", "gpu")  # score.decode: where JPEGs are decoded
SCORE_BACKENDS = ("auto", "torch", "onnxruntime")  # score.backend
TTA_MODES = ("none", "hflip", "crop5")  # test-time augmentation (cxr_ray/apps/tta.py): metric.tta, score.tta
CALIBRATIONS = ("platt", "temperature")  # metric.calibration (cxr_ray/analysis/calibration.py)
# keys that were true/false before: what each meant
LEGACY_BOOLS = {"score.amp": {True: "bf16", False: "fp32"}, "train.use_gpu": {True: "true", False: "false"}}
GPU_SETTINGS = ("auto", "true", "false")  # train.use_gpu


@dataclass(frozen=True)
class DataConfig:
    """Where images come from, how they are split and decoded."""

    root: str = ""  # dataset root (ROOT/{train,val,test}/{NORMAL,PNEUMONIA}) or a CSV/Parquet manifest
    cache_dir: str = ""  # prepared Parquet caches; "" -> $CXR_RAY_CACHE or ~/.cache/cxr_ray
    image_size: int = 0  # side of the square image the model sees; 0 -> the weights' own (224; txrv resnet50: 512)
    cache_size: int = 0  # side stored in the decode-once cache; 0 -> the image size
    val_split: str = "grouped"  # "grouped": carve val from train+val by patient; "official": keep val/
    val_fraction: float = 0.1  # share of each class's images carved for validation (whole patients)
    seed: int = 0  # seeds the patient split
    max_bad_fraction: float = 0.01  # fail when more than this share of images cannot be decoded
    materialize_gb: float = 2.0  # keep a split's decoded pixels in Ray's object store up to this size
    # intensity normalisation the model sees: "per_image" (each image to zero mean, unit std, on
    # the weights' scale: a scanner's exposure and contrast cancel), "fixed" (the weights' own
    # constants: ImageNet's gray mean/std, TorchXRayVision's [-1024, 1024]) or "auto" (per_image,
    # or fixed for TorchXRayVision weights); see cxr_ray/data/preprocessing.py
    normalize: str = "auto"
    # input safety, for prepare and score alike: an image whose header claims more pixels is an
    # error row, refused before decoding (a 4000x4000 X-ray is 16 MP)
    max_pixels: int = 100_000_000
    # a file larger than max_file_mb MB (2**20 bytes) is an error row, refused from its size
    # (stat, or an object's metadata) before a byte is read: each file is read whole into
    # memory, and even an uncompressed 16-bit 4000x4000 DICOM is only 32 MB
    max_file_mb: float = 512.0
    # a read that has not finished after this many seconds (network/FUSE mounts and object
    # stores; local disks are read directly) is an error row (0 = wait forever)
    read_timeout_s: float = 60.0
    # a Ray Data stage (cache build, evaluation, scoring) that yields nothing for this long fails
    # with what it waited for (free CPUs, the placement groups holding them) instead of hanging;
    # 0 = wait forever
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _check_location(self.root, "data.root")
        _check_location(self.cache_dir, "data.cache_dir")
        _check(self.max_pixels >= 64, "data.max_pixels", "an int >= 64", self.max_pixels)
        _check(isinstance(self.stall_timeout_s, (int, float)) and 0 <= self.stall_timeout_s < float("inf"),
               "data.stall_timeout_s", "a float >= 0 (0 = no watchdog)", self.stall_timeout_s)
        _check(isinstance(self.max_file_mb, (int, float)) and 0 < self.max_file_mb < float("inf"),
               "data.max_file_mb", "a finite float > 0", self.max_file_mb)
        _check(self.read_timeout_s >= 0, "data.read_timeout_s", "a float >= 0 (0 = no limit)",
               self.read_timeout_s)
        _check(self.image_size == 0 or 16 <= self.image_size <= 4096, "data.image_size",
               "0 (the weights' own size) or an int in [16, 4096]", self.image_size)
        _check(self.cache_size == 0 or 16 <= self.cache_size <= 4096, "data.cache_size",
               "0 or an int in [16, 4096]", self.cache_size)
        _check(self.cache_size == 0 or self.cache_size >= self.image_size, "data.cache_size",
               f">= data.image_size ({self.image_size}) so the cache is never upscaled", self.cache_size)
        _check(self.val_split in ("grouped", "official"), "data.val_split",
               "one of 'grouped', 'official'", self.val_split)
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "a float in (0, 1)", self.val_fraction)
        _check(self.materialize_gb >= 0.0, "data.materialize_gb", "a float >= 0", self.materialize_gb)
        _check(self.normalize in NORMALIZATIONS, "data.normalize", f"one of {list(NORMALIZATIONS)}", self.normalize)
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "a float in [0, 1]",
               self.max_bad_fraction)

    @property
    def resolved_cache_dir(self) -> str:
        """Cache folder: ``cache_dir``, else ``$CXR_RAY_CACHE``, else ``~/.cache/cxr_ray``."""
        if self.cache_dir:
            return self.cache_dir
        return os.environ.get("CXR_RAY_CACHE") or str(Path.home() / ".cache" / "cxr_ray")


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation; evaluation and scoring never augment."""

    enabled: bool = True  # false: train on the images as they are
    hflip_p: float = 0.5  # probability of a horizontal flip
    rotation_deg: float = 10.0  # uniform rotation in [-deg, deg]
    scale_min: float = 0.9  # random zoom: the side shows [scale_min, scale_max] of the image's side;
    scale_max: float = 1.0  # > 1 zooms out, padding with black (framing: looser and tighter films)
    translate: float = 0.0  # shift by up to this share of the side in x and y (black fill)
    aspect: float = 0.0  # aspect-ratio jitter: width x exp(u), height / exp(u), u in [-aspect, aspect]
    # black bands at the borders (as collimation or a margin adds): the probability per side of a band
    border_p: float = 0.0
    border_max: float = 0.15  # a band's width: up to this share of the side
    brightness: float = 0.1  # additive jitter in [-b, b] on the [0, 1] image
    contrast: float = 0.1  # multiplicative jitter in [1 - c, 1 + c] around the image mean
    # Acquisition differences between scanners and sites (0 switches each off):
    gamma: float = 0.0  # exposure curve: x ** exp(u), u uniform in [-gamma, gamma]
    blur: float = 0.0  # up to this share of a Gaussian blur (sigma 1.5 px at 224 px, scaled with size)
    sharpen: float = 0.0  # up to this unsharp-mask amount (same sigma); one image is blurred or sharpened
    noise: float = 0.0  # Gaussian noise, std uniform in [0, noise] on the [0, 1] image

    def __post_init__(self) -> None:
        _check(0.0 <= self.hflip_p <= 1.0, "augment.hflip_p", "a float in [0, 1]", self.hflip_p)
        _check(0.0 <= self.rotation_deg <= 180.0, "augment.rotation_deg", "a float in [0, 180]",
               self.rotation_deg)
        _check(0.0 < self.scale_min <= 1.0, "augment.scale_min", "a float in (0, 1]", self.scale_min)
        _check(1.0 <= self.scale_max <= 2.0, "augment.scale_max", "a float in [1, 2]", self.scale_max)
        _check(0.0 <= self.translate <= 0.5, "augment.translate", "a float in [0, 0.5]", self.translate)
        _check(0.0 <= self.aspect <= 0.5, "augment.aspect", "a float in [0, 0.5]", self.aspect)
        _check(0.0 <= self.border_p <= 1.0, "augment.border_p", "a float in [0, 1]", self.border_p)
        _check(0.0 <= self.border_max <= 0.4, "augment.border_max", "a float in [0, 0.4]", self.border_max)
        _check(0.0 <= self.brightness < 1.0, "augment.brightness", "a float in [0, 1)", self.brightness)
        _check(0.0 <= self.contrast < 1.0, "augment.contrast", "a float in [0, 1)", self.contrast)
        _check(0.0 <= self.gamma <= 1.0, "augment.gamma", "a float in [0, 1]", self.gamma)
        _check(0.0 <= self.blur <= 1.0, "augment.blur", "a float in [0, 1]", self.blur)
        _check(0.0 <= self.sharpen <= 2.0, "augment.sharpen", "a float in [0, 2]", self.sharpen)
        _check(0.0 <= self.noise <= 0.2, "augment.noise", "a float in [0, 0.2]", self.noise)




@dataclass(frozen=True)
class ModelConfig:
    """Which network, its weights, how much of it trains, and the head."""

    name: str = "resnet50"  # one of MODEL_NAMES
    # "imagenet", "none", "txrv:NAME" (TorchXRayVision's chest X-ray weights, cxr_ray/models/weights.py)
    # or a local state-dict file
    weights: str = "imagenet"
    # a local weights file's provenance, which decides its preprocessing: "" or "imagenet" (ImageNet's),
    # "txrv:NAME" (a copy of those TorchXRayVision weights)
    weights_format: str = ""
    # resnet50: how many last stages train, densenet121: how many last dense blocks (0 = head only, 4 = all + stem)
    unfreeze_depth: int = 1
    dropout: float = 0.3  # dropout before the one-logit head
    width: int = 32  # simple_cnn: channels of the first block (doubles per block)

    def __post_init__(self) -> None:
        _check(self.name in MODEL_NAMES, "model.name", f"one of {list(MODEL_NAMES)}", self.name)
        _check(bool(self.weights), "model.weights", "'imagenet', 'none', 'txrv:NAME' or a file path", self.weights)
        problem = check_spec(self.name, self.weights, self.weights_format)
        if problem:
            raise ConfigError(f"model.weights: {problem}")
        _check(0 <= self.unfreeze_depth <= 4, "model.unfreeze_depth", "an int in [0, 4]",
               self.unfreeze_depth)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "a float in [0, 1)", self.dropout)
        _check(4 <= self.width <= 512, "model.width", "an int in [4, 512]", self.width)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, scale and run bookkeeping for Ray Train."""

    epochs: int = 10  # at most (early stopping: patience)
    batch_size: int = 32  # per worker
    lr: float = 3e-4  # peak AdamW learning rate after warmup
    weight_decay: float = 1e-4  # AdamW's, not on biases and norm weights
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to 0
    pos_weight: float = 0.0  # BCE positive-class weight; 0 -> n_normal / n_pneumonia from train
    num_workers: int = 1  # Ray Train workers (0 = run the loop in the driver process)
    # one GPU per worker (train.gpus_per_worker): "true", "false", or "auto": GPUs when the
    # cluster has one for every worker (said when the run starts), else CPU
    use_gpu: str = "auto"
    # CPUs each worker reserves; 0 = auto: a training run shares the cluster's CPUs (up to one
    # node's) among its workers after train.data_cpus; a tune trial's workers take 1 each.
    cpus_per_worker: float = 0.0
    torch_threads: int = 0  # intra-op threads per worker; 0 = the worker's CPUs, rounded up
    data_cpus: float = 0.5  # CPUs a training run leaves to Ray Data (tune: tune.data_cpus)
    gpus_per_worker: float = 1.0  # used only with use_gpu
    patience: int = 3  # early stopping: epochs without improvement of the selection metric
    min_delta: float = 0.0  # improvement smaller than this does not count
    seed: int = 0  # seeds initialisation, shuffling and augmentation
    max_failures: int = 0  # worker-group restarts Ray Train attempts from the latest checkpoint
    storage_path: str = "runs"  # local folder or pyarrow URI (s3://, gs://) for results
    name: str = ""  # run name; "" -> generated
    keep_checkpoints: int = 2  # best N checkpoints kept by the selection metric
    # training and validation precision: "auto" = bf16 where the device runs it fast (CUDA with
    # bf16; CPUs with AMX or AVX-512 BF16, detected at run time), else fp32; "bf16" / "fp32" force
    # one. The threshold is chosen in it and the checkpoint records it (val_precision).
    amp: str = "auto"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "an int >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "an int >= 1", self.batch_size)
        _check(0.0 < self.lr < 1.0, "train.lr", "a float in (0, 1)", self.lr)
        _check(self.weight_decay >= 0.0, "train.weight_decay", "a float >= 0", self.weight_decay)
        _check(self.warmup_epochs >= 0.0, "train.warmup_epochs", "a float >= 0", self.warmup_epochs)
        _check(self.pos_weight >= 0.0, "train.pos_weight", "a float >= 0", self.pos_weight)
        _check(self.num_workers >= 0, "train.num_workers", "an int >= 0", self.num_workers)
        _check(self.cpus_per_worker >= 0, "train.cpus_per_worker", "a float >= 0 (0 = auto)",
               self.cpus_per_worker)
        _check(self.torch_threads >= 0, "train.torch_threads", "an int >= 0 (0 = auto)", self.torch_threads)
        _check(self.use_gpu in GPU_SETTINGS, "train.use_gpu", f"one of {list(GPU_SETTINGS)} (or true/false)",
               self.use_gpu)
        _check(self.data_cpus >= 0, "train.data_cpus", "a float >= 0", self.data_cpus)
        _check(self.gpus_per_worker > 0, "train.gpus_per_worker", "a float > 0", self.gpus_per_worker)
        _check(self.patience >= 1, "train.patience", "an int >= 1", self.patience)
        _check(self.min_delta >= 0.0, "train.min_delta", "a float >= 0", self.min_delta)
        _check(self.max_failures >= -1, "train.max_failures", "an int >= -1 (-1 = retry forever)",
               self.max_failures)
        _check(bool(self.storage_path), "train.storage_path", "a folder or URI", self.storage_path)
        _check_location(self.storage_path, "train.storage_path")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "an int >= 1",
               self.keep_checkpoints)
        _check(self.amp in PRECISIONS, "train.amp", f"one of {list(PRECISIONS)}", self.amp)


SELECTIONS = ("selection_score", "pauc", "recall_at_specificity", "roc_auc")
THRESHOLD_RULES = ("spec_lower_bound", "point", "recall_target")


@dataclass(frozen=True)
class MetricConfig:
    """Model selection and the operating threshold, both decided on the validation split
    (see ``cxr_ray/analysis/metrics.py`` for the definitions)."""

    min_specificity: float = 0.90  # the operating region: specificity the threshold must keep
    # what early stopping and kept checkpoints rank by: selection_score = pAUC over specificity
    # >= min_specificity with a validation-loss tie-break (does not saturate; chance = 0.5)
    selection: str = "selection_score"
    # recall_target (default): highest threshold whose validation recall >= target_recall: recall
    # first, as much specificity as that leaves (it held recall >= 0.92 and specificity >= 0.82 on
    # every simulated shift in benchmarks/RESULTS.md, where spec_lower_bound fell to 0.87 recall);
    # spec_lower_bound: lowest threshold whose 95% patient-bootstrap lower bound of validation
    # specificity >= min_specificity; point: the point estimate (sits on one image)
    threshold_rule: str = "recall_target"
    target_recall: float = 0.95  # recall_target's recall: the product's target (Kermany 2018: 0.932)
    # calibration: fit metric.calibration's map on each validation pass's logits (stored in the
    # checkpoint, applied by evaluate and score), so probabilities are calibrated; false keeps
    # sigmoid(logit) (T = 1, b = 0)
    calibrate: bool = True
    # the map fitted: "platt" (sigmoid(logit / T + b): also undoes the shift a class-weighted
    # loss gives every logit) or "temperature" (b = 0: keeps the network's own base rate)
    calibration: str = "platt"
    # test-time augmentation modes whose own temperature and threshold are chosen on the
    # validation split after training (and for tune's best trial and ensembles), comma-separated
    # from hflip, crop5 ("" fits none); evaluate/score --tta MODE need the checkpoint to hold that
    # mode's decision (fitted here, or later by cxr-ray fit-tta)
    tta: str = "hflip"

    @property
    def tta_modes(self) -> tuple[str, ...]:
        """``tta`` as modes, e.g. ``"hflip,crop5"`` -> ``("hflip", "crop5")``."""
        return parse_tta_modes(self.tta)

    def __post_init__(self) -> None:
        _check(self.calibration in CALIBRATIONS, "metric.calibration", f"one of {list(CALIBRATIONS)}",
               self.calibration)
        parse_tta_modes(self.tta)  # a ConfigError naming metric.tta
        _check(0.0 < self.min_specificity < 1.0, "metric.min_specificity", "a float in (0, 1)",
               self.min_specificity)
        _check(self.selection in SELECTIONS, "metric.selection", f"one of {list(SELECTIONS)}", self.selection)
        _check(self.threshold_rule in THRESHOLD_RULES, "metric.threshold_rule",
               f"one of {list(THRESHOLD_RULES)}", self.threshold_rule)
        _check(0.0 < self.target_recall < 1.0, "metric.target_recall", "a float in (0, 1)", self.target_recall)


def default_search_space() -> dict[str, dict[str, Any]]:
    """The issue's default search: unfreeze depth, dropout and learning rate."""
    return {
        "model.unfreeze_depth": {"type": "choice", "values": [0, 1, 2, 3, 4]},
        "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.6},
        "train.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-3},
    }


SEARCHERS = ("optuna", "random")


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search over any dotted config keys (``search_space``), scheduled by ASHA."""

    num_samples: int = 16  # trials
    searcher: str = "optuna"  # "optuna" (TPE) or "random"
    # {dotted key: {"type": choice|uniform|loguniform|randint, "values" or "low"/"high"}}
    search_space: dict[str, Any] = field(default_factory=default_search_space)
    metric: str = ""  # what trials are ranked by; "" -> metric.selection (any reported metric; higher is better)
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 3  # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent_trials: int = 0  # 0 -> as many as the cluster's CPUs/GPUs allow
    data_cpus: float = 1.0  # CPUs kept free for Ray Data while trials run
    name: str = ""  # experiment name under train.storage_path; "" -> generated
    seed: int = 0  # searcher seed

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples", "an int >= 1", self.num_samples)
        _check(self.searcher in SEARCHERS, "tune.searcher", f"one of {list(SEARCHERS)}", self.searcher)
        _check(bool(self.search_space), "tune.search_space", "at least one parameter", self.search_space)
        _check(self.grace_period >= 1, "tune.grace_period", "an int >= 1", self.grace_period)
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "an int >= 2", self.reduction_factor)
        _check(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "an int >= 0",
               self.max_concurrent_trials)
        _check(self.data_cpus >= 0, "tune.data_cpus", "a float >= 0", self.data_cpus)


@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring (``cxr-ray score``): scale and output settings; the model's own
    preprocessing always comes from the checkpoint's config."""

    batch_size: int = 64  # images per model forward
    num_actors: int = 1  # predictor actors, each loading the model once (min when max_actors > 0)
    max_actors: int = 0  # > num_actors: autoscale the predictor pool between the two
    cpus_per_actor: float = 0.0  # 0 = auto: the model's measured share of the CPUs (up to a node's), per actor
    gpus_per_actor: float = 0.0  # > 0 runs the model on CUDA; fractions share a GPU between actors
    torch_threads: int = 0  # intra-op threads per CPU actor; 0 -> ceil(cpus_per_actor)
    memory_per_actor_gb: float = 1.5  # heap reserved per predictor actor (Ray "memory"); ResNet-50 CPU: 1.2 GiB
    # CPUs reserved by each read+decode task; 0 = auto: the job measures a file's read+decode and
    # an image's model cost on one core and splits the cluster's CPUs between the two by them
    decode_cpus: float = 0.0
    decode_batch_size: int = 32  # files per read+decode task call
    # where JPEGs are decoded: "cpu" (the read+decode tasks, PIL), "gpu" (the scoring actors, on
    # their device: nvJPEG through torchvision on a GPU; other files, and any JPEG it refuses, on
    # the CPU path), "auto": gpu when the actors have GPUs (score.gpus_per_actor > 0), else cpu
    decode: str = "auto"
    # model precision: "auto" = the checkpoint's own (checkpoint.json val_precision, the precision
    # its threshold was chosen in) where the device runs it fast (bf16: CUDA, or a CPU with AMX /
    # AVX-512 BF16), else fp32; "bf16" / "fp32" force one. (true/false from older configs read as bf16/fp32.)
    amp: str = "auto"
    compile: bool = False  # torch.compile the model in each actor
    # what runs the model in the actors: "torch" (the checkpoint's PyTorch model), or
    # "onnxruntime" (its ONNX export, made once per machine; fp32; needs the onnx extra);
    # "auto": onnxruntime where the job runs fp32 on CPU and the onnx extra is installed
    # (1.7x torch fp32 on the development CPU), torch otherwise (bf16, GPUs, score.compile)
    backend: str = "auto"
    rows_per_file: int = 10_000  # rows per output Parquet file (a committed unit for --resume)
    # test-time augmentation (cxr_ray/apps/tta.py): "none", "hflip" or "crop5"; the mean logit of the
    # views, with the temperature and threshold the checkpoint chose on validation for that mode
    tta: str = "none"

    def __post_init__(self) -> None:
        _check(self.tta in TTA_MODES, "score.tta", f"one of {list(TTA_MODES)}", self.tta)
        _check(self.tta == "none" or self.backend != "onnxruntime", "score.backend",
               "auto or torch with score.tta (test-time augmentation runs in torch)", self.backend)
        _check(self.batch_size >= 1, "score.batch_size", "an int >= 1", self.batch_size)
        _check(self.num_actors >= 1, "score.num_actors", "an int >= 1", self.num_actors)
        _check(self.max_actors == 0 or self.max_actors >= self.num_actors, "score.max_actors",
               f"0 or an int >= score.num_actors ({self.num_actors})", self.max_actors)
        _check(self.cpus_per_actor >= 0, "score.cpus_per_actor", "a float >= 0 (0 = auto)", self.cpus_per_actor)
        _check(self.gpus_per_actor >= 0, "score.gpus_per_actor", "a float >= 0", self.gpus_per_actor)
        _check(self.torch_threads >= 0, "score.torch_threads", "an int >= 0", self.torch_threads)
        _check(self.memory_per_actor_gb >= 0, "score.memory_per_actor_gb", "a float >= 0",
               self.memory_per_actor_gb)
        _check(self.decode_cpus >= 0, "score.decode_cpus", "a float >= 0 (0 = auto)", self.decode_cpus)
        _check(self.decode_batch_size >= 1, "score.decode_batch_size", "an int >= 1",
               self.decode_batch_size)
        _check(self.decode in SCORE_DECODES, "score.decode", f"one of {list(SCORE_DECODES)}", self.decode)
        _check(self.rows_per_file >= 1, "score.rows_per_file", "an int >= 1", self.rows_per_file)
        _check(self.amp in PRECISIONS, "score.amp", f"one of {list(PRECISIONS)}", self.amp)
        _check(self.backend in SCORE_BACKENDS, "score.backend", f"one of {list(SCORE_BACKENDS)}", self.backend)
        _check(self.backend != "onnxruntime" or self.amp != "bf16", "score.amp",
               "auto or fp32 with score.backend=onnxruntime (its export runs fp32; bf16 needs "
               "score.backend=torch)", self.amp)
        _check(self.backend != "onnxruntime" or not self.compile, "score.compile",
               "false with score.backend=onnxruntime (torch.compile applies to the torch backend)", self.compile)


@dataclass(frozen=True)
class StorageConfig:
    """Where object storage lives: a job setting, not part of the model. It is read from the
    command's own --config/--set (before any URI is touched), never from a checkpoint."""

    # S3-compatible endpoint that is not AWS (MinIO, Ceph RGW ...), e.g. http://minio:9000;
    # "" -> $AWS_ENDPOINT_URL, else AWS. Passed on to every Ray worker of the job.
    endpoint_url: str = ""

    def __post_init__(self) -> None:
        _check(not self.endpoint_url or self.endpoint_url.startswith(("http://", "https://")),
               "storage.endpoint_url", "\"\" or an http:// / https:// URL", self.endpoint_url)


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of a cxr_ray job, grouped by section."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        size = self.data.image_size or pretrained_info(self.model.name, self.model.weights,
                                                       self.model.weights_format).image_size
        whose = "" if self.data.image_size else ", the weights' own"
        _check(self.data.cache_size == 0 or self.data.cache_size >= size, "data.cache_size",
               f">= the image size ({size}{whose}) so the cache is never upscaled", self.data.cache_size)

    @property
    def tune_metric(self) -> str:
        """What tune ranks trials by: ``tune.metric``, else ``metric.selection``."""
        return self.tune.metric or self.metric.selection

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON safe) that :meth:`from_dict` turns back into this object."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        """Build from a nested dict; unknown keys and bad types raise :class:`ConfigError`."""
        return _build(cls, data, prefix="")

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        """A config saved by a run or checkpoint (complete at the time it was written).

        A key missing there is filled with the value that version used (``SAVED_DEFAULTS``),
        not today's default, so an old checkpoint keeps its preprocessing and scores as before.
        """
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        for key, value in SAVED_DEFAULTS.items():
            section, name = key.split(".")
            data.setdefault(section, {}).setdefault(name, value)
        return cls.from_dict(data)

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. ``cfg.get("data.image_size")``; an unknown key is a
        :class:`ConfigError` listing the valid ones."""
        if key not in valid_keys():
            raise ConfigError(f"unknown config key {key!r}; valid keys: {valid_keys()}")
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def replace(self, **overrides: Any) -> "ExperimentConfig":
        """Copy with dotted-key overrides applied, e.g. ``replace(**{"data.image_size": 128})``."""
        return apply_overrides(self, overrides)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (next to runs and inside checkpoints)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))  # top-level config sections
# Keys whose default changed that change what a model computes: the value a config saved before
# the key existed meant. Every saved config (checkpoint, run, experiment) is read through these.
SAVED_DEFAULTS = {"data.normalize": "fixed"}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against a field type, allowing int -> float and nothing else."""
    if dataclasses.is_dataclass(typ):
        _check(isinstance(value, Mapping), key, f"a mapping of {typ.__name__} fields", value)
        return _build(typ, value, prefix=key + ".")
    if typ is bool:
        _check(isinstance(value, bool), key, "true or false", value)
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "an int", value)
        return value
    if typ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if typ is str and isinstance(value, bool) and key in LEGACY_BOOLS:
        return LEGACY_BOOLS[key][value]
    if typ is str:
        _check(isinstance(value, str), key, "a string", value)
        return value
    origin = typing.get_origin(typ)
    if origin in (dict, Mapping):
        _check(isinstance(value, Mapping), key, "a mapping", value)
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # a bug in this module, not user input


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: "
            f"{[prefix + k for k in types]}"
        )
    kwargs = {k: _coerce(v, types[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def valid_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the config, e.g. ``['data.root', ...]``."""
    keys: list[str] = []
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += valid_keys(typ, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"data.image_size=224"`` into key and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. data.image_size=224")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def apply_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """Return ``cfg`` with dotted overrides applied and the result validated."""
    data = cfg.to_dict()
    keys = valid_keys()
    for key, value in overrides.items():
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {keys}")
        section, name = key.rsplit(".", 1)
        node = data
        for part in section.split("."):
            node = node[part]
        if isinstance(value, bool) and key in LEGACY_BOOLS:
            value = LEGACY_BOOLS[key][value]
        # YAML reads "weights=none" fine, but "root=123" as int; keep strings strings.
        if isinstance(node[name], str) and not isinstance(value, str) and value is not None:
            value = str(value)
        node[name] = value
    return ExperimentConfig.from_dict(data)


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Leaf keys whose values differ, as ``"key: a_value -> b_value"`` lines."""
    def leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping) and prefix + k in SECTIONS:
                out.update(leaves(v, prefix + k + "."))
            else:
                out[prefix + k] = v
        return out

    la, lb = leaves(a.to_dict()), leaves(b.to_dict())
    return [f"{k}: {la[k]!r} -> {lb[k]!r}" for k in la if la[k] != lb[k]]


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load YAML (or the defaults when ``path`` is None), then apply ``--set`` style overrides."""
    cfg = ExperimentConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        try:
            cfg = ExperimentConfig.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e
    return apply_overrides(cfg, dict(parse_override(o) for o in overrides))


def config_reference() -> str:
    """``docs/config.md``: every key of :class:`ExperimentConfig` with its type, default and the
    comment beside or above it in this file (``python -m cxr_ray.config > docs/config.md``;
    ``tests/test_config.py`` fails when the file is out of date)."""
    source = Path(__file__).read_text()
    comments = {tok.start[0]: (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    lines = ["# Configuration reference", "",
             "Generated from `cxr_ray/config.py` by `python -m cxr_ray.config > docs/config.md`; "
             "`tests/test_config.py` fails when it is out of date. Every key can be set in a YAML file "
             "(`--config`, one mapping per section) or with `--set section.key=value`; `cxr-ray config` "
             "prints the resolved values.", ""]
    for section, typ in _field_types(ExperimentConfig).items():
        node, defaults = classes[typ.__name__], typ()
        lines += [f"## `{section}`", "", inspect.cleandoc(typ.__doc__ or ""), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            name, above, line = item.target.id, [], item.lineno - 1
            while line in comments and comments[line][1]:  # the comment block right above the key
                above.insert(0, comments[line][0])
                line -= 1
            beside = [comments[item.lineno][0]] if item.lineno in comments else []
            meaning = " ".join(above + beside).replace("|", "\\|")
            default = yaml.safe_dump(getattr(defaults, name), default_flow_style=True, width=10**6).strip()
            default = default.removesuffix("\n...").removesuffix(" ...").strip()
            lines.append(f"| `{section}.{name}` | `{ast.unparse(item.annotation)}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference(), end="")
