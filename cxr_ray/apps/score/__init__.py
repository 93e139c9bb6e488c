"""Batch scoring: image folders, globs or manifests -> a Parquet dataset of predictions.

The pipeline is a streaming Ray Dataset::

    file list (driver) --read+decode tasks--> uint8 (1, N, N) --scoring actors--> rows
                       --driver--> OUT/part-<run>-<seq>.parquet (atomic, rows_per_file each)

Decoding, resizing and normalising are the training pipeline's own functions, driven by the
checkpoint's preprocessing contract (``images.load_images``: ``decode_image`` at its cache
size, then ``to_model_size``; the actors' ``inference.Predictor``: ``normalize``), so scores equal
``cxr-ray evaluate``'s. Every listed file yields exactly one row; a file that cannot be read
or decoded gets ``error`` set and null scores. Part files are written to ``OUT/_tmp`` and
moved into place when complete, so readers never see a partial file, and ``--resume``
skips every path already in a committed part.

Modules: ``stages`` (the Ray Data read+decode UDF and the scoring actors, ``ScoreActor``), ``output`` (the
output folder: schema, part files, job record, lease) and ``job`` (the driver: ``run_score``).
This package imports none of them: Ray Data's read tasks import ``stages`` (and so this
package), and must not load the model stack that ``job`` needs.
"""
