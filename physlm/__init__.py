"""physlm: a physics-informed ResNet-BK language model, trained and reported reproducibly."""

__version__ = "0.1.0"
