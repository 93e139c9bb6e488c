"""The one precision policy: which precision (bf16 or fp32) and memory format a model runs in
on a device, for training (``train.amp``), scoring and evaluation (``score.amp``, ``--amp``).

bf16 is a speed path where the device has it in hardware (a CUDA GPU with bf16, a CPU with
AMX / AVX-512 BF16); elsewhere it is emulated and slower, so ``auto`` means fp32 there. A
checkpoint's threshold belongs to the precision it was chosen in: ``auto`` keeps it where fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from cxr_ray.config import PRECISIONS

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}  # Intel Sapphire Rapids and later, AMD Zen 4 and later


@functools.lru_cache(maxsize=None)
def cpu_runs_bf16_fast() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX or AVX-512 BF16, from the kernel's
    ``/proc/cpuinfo`` flags); without them bf16 autocast on CPU is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:  # not Linux: no detection, fp32
        pass
    return False


def runs_bf16_fast(device: torch.device) -> bool:
    """bf16 is a speed path on ``device``: a CUDA GPU with bf16, or a CPU with AMX/AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_runs_bf16_fast()


def resolve_precision(setting: str, device: torch.device, stored: str | None = None) -> str:
    """``"bf16"`` or ``"fp32"`` for a ``train.amp`` / ``score.amp`` setting on ``device``.

    ``bf16``/``fp32`` are taken as given. ``auto`` is bf16 where the device runs it fast, fp32
    otherwise; with ``stored`` (the precision a checkpoint's threshold was chosen in) ``auto``
    keeps a threshold's own precision: fp32 for an fp32 threshold, bf16 only where it is fast.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r}: expected one of {list(PRECISIONS)}")
    if setting != "auto":
        return setting
    if stored == "fp32":
        return "fp32"
    return "bf16" if runs_bf16_fast(device) else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (CPU or CUDA) for ``precision == "bf16"``; a no-op for fp32. Losses,
    metrics and the sigmoid run in fp32 outside it."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prefers_channels_last(device: torch.device) -> bool:
    """channels_last memory format where it is faster: on CUDA and on CPU (oneDNN's NHWC
    convolutions), for every model. Measured on the AMX development CPU, simple_cnn training at
    128 px, batch 32: 62 -> 78 img/s in fp32, 134 -> 169 in bf16; ResNet-50 inference at 224 px:
    10.7 -> 15.6 img/s in fp32. Other devices (e.g. MPS) keep NCHW."""
    return device.type in ("cuda", "cpu")


def inference_precision(setting: str, device: torch.device, stored: str, what: str, why: str = "") -> str:
    """``bf16`` / ``fp32`` for applying a model whose threshold was chosen in ``stored`` precision
    on ``device`` under a ``score.amp``-style ``setting`` (:func:`resolve_precision`); warns,
    naming ``what`` (the checkpoint) and ``why`` (default: the setting or the device), when the
    precision differs from the threshold's own."""
    chosen = resolve_precision(setting, device, stored=stored)
    if chosen != stored:
        log.warning("%s: its threshold was chosen in %s; applying it in %s (%s): probabilities differ "
                    "slightly (bf16 vs fp32 on real images: max 0.02, >= 99.5%% same decisions)",
                    what, stored, chosen,
                    why or (f"amp={setting}" if setting != "auto" else f"{device.type} has no fast bf16"))
    return chosen
