"""ctgen: text-to-3D chest CT generation (GenerateCT) in JAX/Flax NNX."""

__version__ = "0.1.0"
