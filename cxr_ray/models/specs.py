"""What each model and pretrained weights expect: the plain-data catalogue the config checks
``model.name`` / ``model.weights`` against and ``data/preprocessing.py`` turns into the
contract. It imports nothing of cxr_ray and no torch, so it sits at the config's layer
(README, "Design"); ``models/weights.py`` reads the files it names.
"""

from __future__ import annotations

from dataclasses import dataclass

# every model cxr_ray builds (each has its entry in models/registry.py)
MODEL_NAMES = ("resnet50", "densenet121", "simple_cnn")
# one gray mean/std: the averages of ImageNet's RGB statistics (a gray image replicated to RGB)
IMAGENET_GRAY_MEAN = (0.485 + 0.456 + 0.406) / 3
IMAGENET_GRAY_STD = (0.229 + 0.224 + 0.225) / 3
# TorchXRayVision's inputs: 8-bit pixels scaled to [-1024, 1024] (xrv.datasets.normalize), i.e.
# (x - 0.5) / (1 / 2048) for x = pixel / 255; a typical film's spread (std ~0.25 of the range)
# is ~512 in those units, which per-image standardisation is scaled to
TXRV_MEAN, TXRV_STD, TXRV_PER_IMAGE_SCALE = 0.5, 1.0 / 2048.0, 512.0
TXRV_RELEASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"


@dataclass(frozen=True)
class Pretrained:
    """What a family of weights expects from its input, and where the file comes from."""

    source: str  # "imagenet", "txrv", "none" (random), "file" (a local state dict)
    image_size: int  # the resolution the weights were trained at (data.image_size=0 uses it)
    mean: float  # data.normalize=fixed: (x - mean) / std, x = pixel / 255
    std: float
    per_image_scale: float  # data.normalize=per_image: each image standardised, times this
    normalize: str  # what data.normalize=auto means for these weights
    arch: str = ""  # the model.name the file fits ("" = any)
    file: str = ""  # file name in TorchXRayVision's cache
    trained_on: str = ""

    @property
    def url(self) -> str:
        return TXRV_RELEASE + self.file if self.source == "txrv" else ""


_IMAGENET_LIKE = dict(image_size=224, mean=IMAGENET_GRAY_MEAN, std=IMAGENET_GRAY_STD, per_image_scale=1.0,
                      normalize="per_image")
IMAGENET = Pretrained("imagenet", **_IMAGENET_LIKE)
RANDOM = Pretrained("none", **_IMAGENET_LIKE)
LOCAL_FILE = Pretrained("file", **_IMAGENET_LIKE)


def _txrv(arch: str, size: int, file: str, trained_on: str) -> Pretrained:
    return Pretrained("txrv", size, TXRV_MEAN, TXRV_STD, TXRV_PER_IMAGE_SCALE, "fixed", arch, file, trained_on)


_D121 = "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
# TorchXRayVision's published models (xrv.models.model_urls): name -> architecture, resolution, file
TXRV_WEIGHTS: dict[str, Pretrained] = {
    "densenet121-res224-all": _txrv("densenet121", 224, f"nih-pc-chex-mimic_ch-google-openi-kaggle-{_D121}",
                                    "NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, RSNA"),
    "densenet121-res224-nih": _txrv("densenet121", 224, f"nih-{_D121}", "NIH ChestX-ray14"),
    "densenet121-res224-pc": _txrv("densenet121", 224, f"pc-{_D121}", "PadChest"),
    "densenet121-res224-chex": _txrv("densenet121", 224, f"chex-{_D121}", "CheXpert"),
    "densenet121-res224-rsna": _txrv("densenet121", 224, f"kaggle-{_D121}", "RSNA Pneumonia Challenge"),
    "densenet121-res224-mimic_nb": _txrv("densenet121", 224, f"mimic_nb-{_D121}", "MIMIC-CXR (NegBio labels)"),
    "densenet121-res224-mimic_ch": _txrv("densenet121", 224, f"mimic_ch-{_D121}", "MIMIC-CXR (CheXpert labels)"),
    "resnet50-res512-all": _txrv("resnet50", 512, "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt",
                                 "PadChest, NIH, RSNA, SIIM, VinDr-CXR"),
}
WEIGHTS_FORMATS = ("imagenet", *(f"txrv:{n}" for n in TXRV_WEIGHTS))  # model.weights_format of a local file


def txrv_name(weights: str) -> str | None:
    """``NAME`` of ``txrv:NAME`` (None for other settings)."""
    return weights[len("txrv:"):] if weights.startswith("txrv:") else None


def check_spec(model_name: str, weights: str, weights_format: str = "") -> str | None:
    """Why ``model.weights`` (and ``model.weights_format``) cannot work for ``model_name``, or None."""
    name = txrv_name(weights)
    if name is not None:
        if name not in TXRV_WEIGHTS:
            return f"unknown TorchXRayVision weights {name!r}; known: {sorted(TXRV_WEIGHTS)}"
        arch = TXRV_WEIGHTS[name].arch
        if arch != model_name:
            return f"txrv:{name} is a {arch}; set model.name={arch} (model.name is {model_name!r})"
    if weights_format:
        if weights in ("none", "imagenet") or name is not None:
            return f"model.weights_format describes a local weights file; model.weights is {weights!r}"
        if weights_format not in WEIGHTS_FORMATS:
            return f"model.weights_format must be one of {list(WEIGHTS_FORMATS)}, got {weights_format!r}"
        fmt = txrv_name(weights_format)
        if fmt and TXRV_WEIGHTS[fmt].arch != model_name:
            return f"model.weights_format {weights_format} is a {TXRV_WEIGHTS[fmt].arch}, not a {model_name}"
    return None


def pretrained_info(model_name: str, weights: str, weights_format: str = "") -> Pretrained:
    """What the weights named by ``model.weights`` expect (the scratch CNN: like ``none``)."""
    if model_name == "simple_cnn" or weights == "none":
        return RANDOM
    if weights == "imagenet":
        return IMAGENET
    name = txrv_name(weights) or txrv_name(weights_format)
    if name:
        return TXRV_WEIGHTS[name]
    return IMAGENET if weights_format == "imagenet" else LOCAL_FILE
