"""Every path of a run directory, defined once: every stage asks here (pure layer).

::

    <runs_dir>/mlflow.db  mlflow-artifacts/   the MLflow store (tracking.backend: mlflow)
    <runs_dir>/<experiment>/              run_dir(config)
        config.yaml                       the run's resolved config (RUN_CONFIG)
        folds.csv                         the split (FOLDS)
        cache/                            resized images and masks (CACHE)
        fold_<K>/                         one segmentation fold (fold_dir)
            best_weights.h5  history.csv  curves.png  checkpoint/  tensorboard/
            config.yaml                   the settings the fold was trained with
            oof/                          its validation probabilities (a prob store)
            oof_presence.csv              the presence head's (model.classification_head)
            metrics.json                  written last: the fold is finished
            .lock                         held while a process trains the fold
            tracking.json                 its MLflow run (tracking.backend: mlflow)
        classifier/fold_<K>/              one classifier fold (same files; oof_cls.csv)
        postprocess.json  postprocess_grid.csv  postprocess_table.csv     tune
        predict.json  predict_tmp/                                         predict
        report/  report.md  report.html  metrics.json  figures ...          evaluate
        lr_find/  lr_find.csv  lr_find.png  lr_find.json                    lr_find
        config.jobs.yaml                                                   fold jobs

A test (tests/unit/test_layout.py) checks that none of these names is written as a
string literal anywhere else in the package.
"""

from __future__ import annotations

from pathlib import Path

# The run directory
RUN_CONFIG = "config.yaml"
FOLDS = "folds.csv"
CACHE = "cache"
FOLD_PREFIX = "fold_"
CLASSIFIER_STAGE = "classifier"
JOBS_CONFIG = "config.jobs.yaml"

# One fold (segmentation or classifier)
BEST_WEIGHTS = "best_weights.h5"
CHECKPOINT = "checkpoint"
SWA = "swa"  # train.swa_top: the best epochs' weights, averaged at the end of training
SWA_EPOCH = "epoch_{epoch:03d}.h5"
STATE = "state.json"
HISTORY = "history.csv"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
TRAINED_CONFIG = RUN_CONFIG
FOLD_METRICS = "metrics.json"
OOF = "oof"
OOF_CLS = "oof_cls.csv"
OOF_PRESENCE = "oof_presence.csv"  # model.classification_head: the head's OOF presence
LOCK = ".lock"
TRACKING_RUN = "tracking.json"  # tracking.backend: mlflow: the fold's MLflow run id

# Tuning, prediction, the LR finder
POSTPROCESS = "postprocess.json"
POSTPROCESS_GRID = "postprocess_grid.csv"
POSTPROCESS_TABLE = "postprocess_table.csv"
PREDICT = "predict.json"
TEST_PROBS = "test_probs"  # predict's fold-merged test probs, uint8 store at submission size
TEST_PRESENCE = "test_presence.csv"  # the presence head's test probs (fold and view mean)
TEST_CLS = "test_cls.csv"  # the separate classifier's test probs (fold and view mean)
TEST_PROBS_KEY = "test_probs.json"  # what they were predicted from (run.stored_predictions)
ENSEMBLE = "ensemble.json"
ENSEMBLE_REPORT = "ensemble.md"
PSEUDO_LABELS = "pseudo_labels.csv"  # confident test labels (the pseudo-label stage)
PSEUDO_LABELS_JSON = "pseudo_labels.json"
PREDICT_WORK = "predict_tmp"
OPENVINO_CACHE = "openvino"  # predict.engine openvino: each fold's IR, converted once
ONNX_CACHE = "onnx"  # predict.engine onnxruntime: each fold's ONNX, converted once
FOLD_MERGE = "fold_merge.npy"
LR_FIND_DIR = "lr_find"
LR_FIND_CSV = "lr_find.csv"
LR_FIND_PNG = "lr_find.png"
LR_FIND_JSON = "lr_find.json"

# The report (evaluate)
REPORT = "report"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_METRICS = FOLD_METRICS
SCORES_BY_FOLD = "scores_by_fold.csv"
SCORES_SUMMARY = "scores_summary.csv"
FIGURE_SCORES = "scores.png"
FIGURE_CONFUSION = "confusion.png"
FIGURE_ROC = "roc.png"
FIGURE_WORST = "worst.png"

# A grid search (its own directory of runs)
GRID = "grid.json"
GRID_RESULTS = "results.csv"
GRID_SUMMARY = "summary.csv"
GRID_TUNED = "tuned"  # tuned/<experiment>.json: the scores --tune read, and their key

# Experiment tracking (tracking.backend: mlflow, no tracking.uri): in <runs_dir>
TRACKING_DB = "mlflow.db"
TRACKING_ARTIFACTS = "mlflow-artifacts"

# Submissions
SUBMISSION_LOG = "history.md"


def fold_dir(run_dir: Path, fold: int, stage: str = "") -> Path:
    """``run_dir/[stage/]fold_<fold>``: one fold's outputs (stage e.g. ``classifier``)."""
    base = run_dir / stage if stage else run_dir
    return base / f"{FOLD_PREFIX}{fold}"


def report_dir(run_dir: Path) -> Path:
    """Where ``evaluate`` writes the report."""
    return run_dir / REPORT
