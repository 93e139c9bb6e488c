"""A model exported by ``cxr-ray export --format onnx`` run by ONNX Runtime (the ``onnx``
extra): the scoring actors' ``score.backend=onnxruntime``. The export takes 8-bit gray / 255
and normalises inside the model (``apps/export.py``)."""

from __future__ import annotations

import os

import numpy as np

INPUT_NAME, OUTPUT_NAME = "image", "logit"  # the exported graph's input and output


class OnnxModel:
    """An ONNX export run by ONNX Runtime on CPU, or CUDA when asked and available:
    ``logits(images)`` for float32 ``(B, 1, N, N)`` images in [0, 1]."""

    def __init__(self, path: str | os.PathLike, threads: int = 0, cuda: bool = False):
        try:
            import onnxruntime as ort  # optional extra: imported when an export is run
        except ImportError as e:
            raise ImportError(f"running {path} needs onnxruntime (pip install 'cxr_ray[onnx]')") from e
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: a scoring actor shares its node with the
        # read + decode tasks, and spinning threads took CPU from them between batches
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("score.backend=onnxruntime on GPU needs onnxruntime-gpu "
                                   "(CUDAExecutionProvider); this onnxruntime has "
                                   f"{ort.get_available_providers()}")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """``(B,)`` float32 logits."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0][:, 0]
