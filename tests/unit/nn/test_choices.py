"""``config.CHOICES`` agrees with the constants of the modules that own each choice.

The pure ones (folds, TTA merges) are derived from their modules; the Keras layer's
cannot be imported by the pure config, so they are checked here.
"""

from pipeline.core.config import CHOICES
from pipeline.core.folds import FOLD_METHODS
from pipeline.core.formats import LAYOUTS
from pipeline.core.tta import MERGES
from pipeline.nn.classifier import POOLINGS
from pipeline.nn.devices import STRATEGIES
from pipeline.nn.losses import LOSSES
from pipeline.nn.model import ARCHITECTURES, DECODER_BLOCK_TYPES


def test_every_choice_matches_its_owner():
    owners = {
        "data.layout": ("auto", *LAYOUTS),
        "folds.method": FOLD_METHODS,
        "model.architecture": ARCHITECTURES,
        "model.decoder_block_type": DECODER_BLOCK_TYPES,
        "train.loss": tuple(LOSSES),
        "train.strategy": STRATEGIES,
        "tta.merge": MERGES,
        "classifier.pooling": POOLINGS,
    }
    for key, owned in owners.items():
        assert set(CHOICES[key]) == set(owned), key
    for key in ("train.monitor_mode", "classifier.monitor_mode"):
        assert set(CHOICES[key]) == {"min", "max"}
