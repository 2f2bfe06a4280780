"""The optimizer of every training run: Adam with gradient accumulation (``AccumAdam``).

One class per Keras layer, behind the same arguments and behaviour: N accumulated steps
of batch b equal one Adam step on batch N*b (tests/unit/nn/test_optim.py proves it for
both), ``scale_lr`` trains some variables at a fraction of the learning rate, and
weight decay (AdamW, decoupled) is applied once per applied step.

- tf_keras: ``nn.optim_tf_keras`` (accumulators of its own in ``apply_gradients``);
- Keras 3: ``nn.optim_keras3`` (Keras' own ``gradient_accumulation_steps``).
"""

from typing import Any

from pipeline.nn.keras_backend import KERAS3

if KERAS3:
    from pipeline.nn.optim_keras3 import AccumAdam
else:
    from pipeline.nn.optim_tf_keras import AccumAdam

_PER_MICRO_BATCH_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm")


def _check_accumulation_steps(accumulation_steps: int) -> None:
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or accumulation_steps < 1
    ):
        raise ValueError(f"accumulation_steps must be an integer >= 1; got {accumulation_steps!r}")


def make_optimizer(lr: float, accumulation_steps: int, **adam_kwargs: Any) -> AccumAdam:
    """An ``AccumAdam`` with learning rate ``lr``; ``adam_kwargs`` go to Adam."""
    _check_accumulation_steps(accumulation_steps)
    if accumulation_steps > 1:
        for option in _PER_MICRO_BATCH_OPTIONS:
            if adam_kwargs.get(option):
                raise ValueError(
                    f"{option} is not supported with accumulation_steps > 1 (it would "
                    f"act on each micro-batch); got {option}={adam_kwargs[option]!r}"
                )
        if adam_kwargs.get("use_ema"):
            raise ValueError("use_ema is not supported with accumulation_steps > 1; got True")
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    return AccumAdam(learning_rate=lr, accumulation_steps=accumulation_steps, **adam_kwargs)


__all__ = ["AccumAdam", "make_optimizer"]
