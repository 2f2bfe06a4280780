"""The Keras layer: the one door to TensorFlow (``keras_backend``), models, losses, the
optimizer, the input pipeline, the trainer, the classifier, inference and devices."""
