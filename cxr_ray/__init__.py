"""cxr_ray: train, tune and run chest X-ray pneumonia classifiers at scale on Ray."""

__version__ = "0.1.0"
