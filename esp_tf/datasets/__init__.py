"""TFDS builders shipped with esp_tf.

Importing this package registers the builders with TFDS (a ``GeneratorBasedBuilder`` subclass
registers itself on import), so that ``tfds.load('fashion_mnist_mini', ...)`` works by name.
"""
from esp_tf.datasets.fashion_mnist_mini.fashion_mnist_mini import FashionMnistMini

__all__ = ["FashionMnistMini"]
