"""The schema's choices agree with the constants of the modules that own each choice.

The pure ones (folds, TTA merges, ...) are the owners' own ``Literal`` types; the Keras
layer's cannot be imported by the pure schema, so they are checked here.
"""

from pipeline.core.folds import FOLD_METHODS
from pipeline.core.formats import CSV_FORMATS
from pipeline.core.postprocess import AT_LEAST_ONE_CHOICES, GATES
from pipeline.core.precision import PRECISIONS
from pipeline.core.schema import choices
from pipeline.core.tta import MERGES
from pipeline.nn.classifier import POOLINGS
from pipeline.nn.devices import STRATEGIES
from pipeline.nn.losses import LOSSES
from pipeline.nn.model import ARCHITECTURES, DECODER_BLOCK_TYPES


def test_every_choice_matches_its_owner():
    owners = {
        "data.csv_format": ("auto", *CSV_FORMATS),
        "folds.method": FOLD_METHODS,
        "model.architecture": ARCHITECTURES,
        "model.decoder_block_type": DECODER_BLOCK_TYPES,
        "train.loss": tuple(LOSSES),
        "train.strategy": STRATEGIES,
        "tta.merge": MERGES,
        "predict.precision": PRECISIONS,
        "classifier.pooling": POOLINGS,
        "postprocess.at_least_one": AT_LEAST_ONE_CHOICES,
    }
    for key, owned in owners.items():
        assert set(choices(key)) == set(owned), key
    for key in ("train.monitor_mode", "classifier.monitor_mode"):
        assert set(choices(key)) == {"min", "max"}
    assert set(GATES) == {"none", "classifier", "segmentation", "fused"}
