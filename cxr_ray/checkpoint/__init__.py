"""Checkpoints: ``format`` writes and checks ``checkpoint.json`` (the one writer), ``load``
rebuilds a model from a checkpoint folder or URI. The names below are the package's API."""

from cxr_ray.checkpoint.format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MEMBERS_DIR,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointMeta,
    checkpoint_files,
    meta_digest,
    read_meta,
    safe_load,
    save_checkpoint,
    unwrap,
    versions,
    write_meta,
    write_tta_decisions,
)
from cxr_ray.checkpoint.load import LoadedCheckpoint, fetch_checkpoint, load_checkpoint, load_train_state

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "MEMBERS_DIR", "META_FILE", "MODEL_FILE", "STATE_FILE", "CheckpointMeta",
           "LoadedCheckpoint", "checkpoint_files", "fetch_checkpoint", "load_checkpoint", "load_train_state",
           "meta_digest", "read_meta", "safe_load", "save_checkpoint", "unwrap", "versions", "write_meta",
           "write_tta_decisions"]
