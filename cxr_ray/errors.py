"""Every error cxr_ray raises for something the user can fix: a bad setting, input, file or
place. Each message names what was expected, what was found and where. They share one base,
:class:`CxrRayError`, which the command line catches (exit code 2, one line on stderr); any
other exception is a failure (exit code 1, the traceback in a log file). Each keeps the
built-in base it always had (``ValueError`` for bad values, ``RuntimeError`` for things that
cannot be done), so ``except ValueError`` callers behave as before.
"""

from __future__ import annotations


class CxrRayError(Exception):
    """Base of cxr_ray's user-facing errors (see the module doc)."""


class ConfigError(CxrRayError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


class StorageError(CxrRayError, RuntimeError):
    """A storage location cannot be used (no such bucket, no access, bad URI); names the URI."""


class ClusterError(CxrRayError, RuntimeError):
    """The Ray cluster cannot run the job as configured (e.g. node-local storage on many nodes)."""


class DataError(CxrRayError, ValueError):
    """The dataset, a manifest or an image is not what cxr_ray expects; names the path."""


class PreprocessingError(CxrRayError, ValueError):
    """A stored contract is malformed or two contracts that must agree do not."""


class WeightsError(CxrRayError, RuntimeError):
    """Pretrained weights could not be loaded; says which file to place where."""


class CheckpointError(CxrRayError, RuntimeError):
    """A checkpoint folder is missing, incomplete or unsafe to load; names the path."""


class EnsembleError(CxrRayError, ValueError):
    """Checkpoints cannot form an ensemble (mismatched preprocessing or split, too few)."""


class ExportError(CxrRayError, RuntimeError):
    """A model could not be exported, or an export folder is unusable; names the path."""


class ExplainError(CxrRayError, RuntimeError):
    """Explanations cannot be made (missing extra, unknown model)."""


class ScoreError(DataError):
    """The scoring job cannot start (output folder, resources, checkpoint mismatch)."""
