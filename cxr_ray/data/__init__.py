"""Data side of cxr_ray: catalog, decoding, the decode-once cache, Ray Data pipelines, synthetic data."""
