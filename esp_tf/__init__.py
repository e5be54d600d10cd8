"""esp_tf: dataset condensation with Expert Subspace Projection (ESP) in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
