"""The run layer: experiments, their locks, fold jobs and command-line plumbing.

Never imports TensorFlow (tests/unit/test_pure_layer.py).
"""
