"""foldseg: k-fold U-Net segmentation for Kaggle-style RLE data sets."""

__version__ = "0.1.0"
