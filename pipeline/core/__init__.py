"""The pure core: data formats, masks, folds, metrics, TTA, post-processing and its
search, the probability store, the configuration and the run layout.

Never imports TensorFlow (tests/unit/test_pure_layer.py).
"""
