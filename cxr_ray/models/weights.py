"""Pretrained weights: what each one expects (its preprocessing), where it comes from, and
how its state dict is read. ``models/registry.build_model`` builds the architecture; this module
supplies the weights and ``data.preprocessing`` turns the expectations into the contract.

``model.weights`` is one of:

- ``none``: random initialisation;
- ``imagenet``: torchvision's ImageNet weights (downloaded into torch's hub cache);
- ``txrv:NAME``: a TorchXRayVision model trained on chest X-rays (``TXRV_WEIGHTS``), fetched
  the TorchXRayVision way into its cache (``~/.torchxrayvision/models_data/``) or read from
  there on an offline machine;
- a local file: a state dict (or ``{"state_dict": ...}``) for the architecture. Its
  preprocessing is ImageNet's unless ``model.weights_format`` says it is a TorchXRayVision file.

Nothing here touches the network at import time; only :func:`pretrained_state` (called when a
model is built with pretrained weights) may download.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import stat
from typing import Any

from cxr_ray.errors import WeightsError
from cxr_ray.models.pickled import InertModule, PickleRefused, load_pickled, module_state_dict
from cxr_ray.models.specs import TXRV_WEIGHTS, txrv_name

log = logging.getLogger(__name__)

def txrv_cache_dir() -> str:
    """TorchXRayVision's weights folder (``xrv.utils.get_cache_dir()``: ~/.torchxrayvision/models_data)."""
    return os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data"))


def txrv_file(name: str, download: bool = True) -> str:
    """Local path of TorchXRayVision weights ``name``: its cache, downloaded there the
    TorchXRayVision way (``xrv.models.get_weights``) when missing and ``download`` is set.
    Raises :class:`WeightsError` saying which file to place where when it cannot."""
    info = TXRV_WEIGHTS[name]
    local = os.path.join(txrv_cache_dir(), info.file)
    if os.path.isfile(local):
        return local
    place = (f"On an offline machine download {info.url} elsewhere and place it at {local} (or pass "
             f"--set model.weights=/path/to/{info.file} --set model.weights_format=txrv:{name}).")
    if not download:
        raise WeightsError(f"TorchXRayVision weights txrv:{name} are not in its cache. {place}")
    try:
        import torchxrayvision as xrv
    except ImportError as e:
        raise WeightsError(f"model.weights=txrv:{name} is fetched by TorchXRayVision, which is not installed: "
                           f"pip install 'cxr-ray[txrv]'. {place}") from e
    try:
        return str(xrv.models.get_weights(name, cache_dir=txrv_cache_dir()))
    except Exception as e:  # requests' ConnectionError, HTTPError, ...: all mean "no download"
        raise WeightsError(f"could not download TorchXRayVision weights txrv:{name} ({e}). {place}") from e


# a weights file is read whole into memory, once; ResNet-50 / DenseNet-121 files are ~100 / ~30 MB
MAX_WEIGHTS_BYTES = 4 << 30


def read_weights_bytes(path: str, what: str) -> bytes:
    """The bytes of weights file ``path``, read through one open handle (what is checked is
    what is loaded: nothing reopens it by path). Not a regular file, or over
    :data:`MAX_WEIGHTS_BYTES`: :class:`WeightsError`."""

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise WeightsError(f"{what}: {path} is not a regular file")
            if st.st_size > MAX_WEIGHTS_BYTES:
                raise WeightsError(f"{what}: {path} is {st.st_size / 2**30:.1f} GiB, over the "
                                   f"{MAX_WEIGHTS_BYTES >> 30} GiB a weights file may have")
            data = f.read(MAX_WEIGHTS_BYTES + 1)
    except OSError as e:
        raise WeightsError(f"{what}: {path!r} is not an existing, readable file ({e.strerror or e})") from e
    if len(data) > MAX_WEIGHTS_BYTES:  # it grew while being read
        raise WeightsError(f"{what}: {path} is over the {MAX_WEIGHTS_BYTES >> 30} GiB a weights file may have")
    return data


def read_state_file(path: str, what: str, txrv: bool = False) -> dict[str, Any]:
    """A state dict from a weights file: a plain state dict or ``{"state_dict": ...}``, loaded
    with ``weights_only=True``. With ``txrv`` (TorchXRayVision's cache, or a file declared by
    ``model.weights_format=txrv:NAME``) also a pickled TorchXRayVision model, as its DenseNet
    release files are, read as data by :mod:`cxr_ray.models.pickled` (no code of the file runs)."""

    import torch

    data = read_weights_bytes(path, what)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not txrv:
            raise WeightsError(f"{what}: {path} holds more than tensors (a pickled model?) and was not loaded: "
                               f"it could run code. A TorchXRayVision file: add --set "
                               f"model.weights_format=txrv:NAME ({str(e).splitlines()[0]})") from e
        state = _load_pickled_model(data, path, what)
    except Exception as e:  # not a torch file at all: truncated, a zip of something else, text...
        raise WeightsError(f"{what}: {path} is not a torch weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(type(k) is str and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsError(f"{what}: {path} holds a {type(state).__name__}, not a state dict of named tensors")
    # TorchXRayVision's ResNet wraps torchvision's as .model; their operating points are no weights
    return {k.removeprefix("model."): v.detach() for k, v in state.items() if k != "op_threshs"}


def _load_pickled_model(data: bytes, path: str, what: str) -> Any:
    """The state dict of a pickled TorchXRayVision model (its DenseNet release files, zip or
    legacy format), read by the restricted unpickler of :mod:`cxr_ray.models.pickled`: module
    classes become inert placeholders, tensors are rebuilt by torch, anything else is refused
    with one line naming the file and what it named."""

    try:
        obj = load_pickled(data)
        return module_state_dict(obj) if isinstance(obj, InertModule) else obj
    except PickleRefused as e:
        raise WeightsError(f"{what}: {path} refused, it is not a model made only of tensors and torch / "
                           f"TorchXRayVision model classes (it could run code on load): {e}") from e
    except Exception as e:  # anything else a crafted file provokes is a refusal too, by type only
        raise WeightsError(f"{what}: {path} refused: reading it failed with {type(e).__name__}") from e


def pretrained_state(model_name: str, weights: str, weights_format: str = "") -> dict[str, Any] | None:
    """The state dict named by ``model.weights`` (None for ``none``); may download (see module doc)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state(model_name)
    name = txrv_name(weights)
    if name is not None:
        return read_state_file(txrv_file(name), f"model.weights=txrv:{name}", txrv=True)
    return read_state_file(weights, "model.weights", txrv=weights_format.startswith("txrv:"))


def ensure_available(model_name: str, weights: str, weights_format: str = "") -> None:
    """Fetch (or find and read) the weights ``model.weights`` names now, in the driver before
    Ray starts, so that an offline machine or a bad file fails before any work (the training
    workers then read them from the same caches). No-op for ``none`` and the scratch CNN."""
    if weights != "none" and model_name != "simple_cnn":
        pretrained_state(model_name, weights, weights_format)


def _imagenet_state(model_name: str) -> dict[str, Any]:
    """torchvision's ImageNet weights for ``model_name``: its download and cache, the file's
    SHA-256 checked against the prefix in its name on download, read with ``weights_only=True``."""
    import torch
    from torchvision.models import DenseNet121_Weights, ResNet50_Weights

    w = {"resnet50": ResNet50_Weights.IMAGENET1K_V2, "densenet121": DenseNet121_Weights.IMAGENET1K_V1}[model_name]
    try:
        return w.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, HTTPError, SSL errors...: all mean "no download"
        raise WeightsError(
            f"could not load torchvision's ImageNet {model_name} weights ({w.url}): {e}. Put the file in "
            f"torch's cache ({torch.hub.get_dir()}/checkpoints/) or pass a local file with --set "
            f"model.weights=/path/to/{os.path.basename(w.url)}, or use model.weights=none.") from e
