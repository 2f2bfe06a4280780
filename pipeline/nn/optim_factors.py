"""What both ``AccumAdam`` classes add to Adam per variable: a learning-rate factor
(``scale_lr``, e.g. the encoder's) and decoupled weight decay once per applied step."""

from typing import Any

from pipeline.nn.keras_backend import tf


class LrFactors:
    """Mixin before Keras' Adam: ``scale_lr`` and the scaled, decaying learning rate.

    The class using it sets ``self._lr_factors = {}`` in its ``__init__`` and calls
    ``_decayed_lr`` at the start of its ``update_step``.
    """

    _lr_factors: dict[str, float]

    def scale_lr(self, variables: list[Any], factor: float) -> None:
        """Train ``variables`` at ``factor`` times the learning rate (and weight decay)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0; got {factor}")
        for var in variables:
            self._lr_factors[self._var_key(var)] = float(factor)  # type: ignore[attr-defined]

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        """No-op: ``_decayed_lr`` decays each variable once per applied Adam step."""

    def _decayed_lr(self, variable: Any, learning_rate: Any) -> Any:
        """This variable's learning rate (its factor applied), after decaying it by
        ``weight_decay * lr`` (AdamW, decoupled), as Keras' AdamW does before its step."""
        dtype = variable.dtype
        factor = self._lr_factors.get(self._var_key(variable), 1.0)  # type: ignore[attr-defined]
        lr = tf.cast(learning_rate, dtype) * tf.cast(factor, dtype)
        decay = self.weight_decay  # type: ignore[attr-defined]
        if decay and self._use_weight_decay(variable):  # type: ignore[attr-defined]
            variable.assign_sub(variable * tf.cast(decay, dtype) * lr)
        return lr
