"""The embedded ``fashion_mnist_mini`` dataset (a small real subset of Fashion-MNIST)."""
from esp_tf.datasets.fashion_mnist_mini.fashion_mnist_mini import FashionMnistMini

__all__ = ["FashionMnistMini"]
