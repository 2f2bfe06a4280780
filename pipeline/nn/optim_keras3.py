"""``AccumAdam`` for Keras 3: its own gradient accumulation, our LR factors and decay.

Keras 3's optimizers accumulate natively (``gradient_accumulation_steps``): each
``apply`` adds the (replica-reduced) gradients to per-variable accumulators and, on
every ``accumulation_steps``-th call, applies one step with their mean and clears them.
``iterations`` then counts applied steps (the internal counter divided by the steps),
so Adam's bias correction is that of training on the concatenated batch; the proof is
the same test as for the tf_keras optimizer (tests/unit/nn/test_optim.py).

On top of Keras' Adam this adds what ``nn.optim``'s tf_keras ``AccumAdam`` offers:
``scale_lr`` (some variables, e.g. the encoder's, at a fraction of the learning rate,
their decay scaled with it as in a PyTorch parameter group), decoupled weight decay
applied once per applied step inside ``update_step``, and ``micro_step``.
BatchNorm: accumulation sums gradients only; BatchNorm's moving statistics are updated
by every forward pass in training mode, i.e. once per micro-batch of ``batch_size``.

Under a multi-replica ``tf.distribute`` strategy Keras 3.15's accumulation fails: it
all-reduces the gradients through a ``merge_call`` inside its ``cond`` (update or
accumulate), which tf.distribute refuses. ``_backend_apply_gradients`` then does the
same arithmetic in the other order: all-reduce in the replica context, then one
``merge_call`` whose cross-replica function holds the ``cond`` and updates every
replica's variables and accumulators with ``extended.update`` (clipping and Keras'
EMA, which ``optim.make_optimizer`` refuses with accumulation, are not applied there).
"""

from typing import Any

from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.optim_factors import LrFactors


def unwrap(variable: Any) -> Any:
    """The tf.Variable behind a Keras 3 variable (tf.distribute updates tf.Variables)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


@keras.utils.register_keras_serializable(package="foldseg")
class AccumAdam(LrFactors, keras.optimizers.Adam):
    """Adam that applies one step per ``accumulation_steps`` calls, with the mean gradient."""

    def __init__(
        self,
        learning_rate: float = 0.001,
        accumulation_steps: int = 1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        name: str = "AccumAdam",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("gradient_accumulation_steps", None)
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            name=name,
            gradient_accumulation_steps=accumulation_steps if accumulation_steps > 1 else None,
            **kwargs,
        )
        self.accumulation_steps = accumulation_steps
        self._lr_factors: dict[str, float] = {}

    @property
    def micro_step(self) -> tf.Tensor:
        """int64 scalar: micro-batches accumulated since the last Adam step."""
        return tf.math.floormod(tf.cast(self._iterations, tf.int64), self.accumulation_steps)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Adam's step at this variable's learning rate, after its weight decay."""
        super().update_step(gradient, variable, self._decayed_lr(variable, learning_rate))

    def _backend_apply_gradients(self, grads: list[Any], trainable_variables: list[Any]) -> None:
        context = tf.distribute.get_replica_context()
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if not self.gradient_accumulation_steps or context is None or replicas == 1:
            super()._backend_apply_gradients(grads, trainable_variables)
            return
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))
        accumulators = [
            self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables
        ]
        context.merge_call(
            self._accumulate_or_apply,
            args=(
                reduced,
                [unwrap(v) for v in trainable_variables],
                [unwrap(a) for a in accumulators],
            ),
        )

    def _accumulate_or_apply(
        self,
        distribution: tf.distribute.Strategy,
        grads: list[Any],
        variables: list[Any],
        accumulators: list[Any],
    ) -> None:
        """Cross-replica: add ``grads`` to the accumulators, or on every
        ``gradient_accumulation_steps``-th call apply their mean and clear them."""
        steps = self.gradient_accumulation_steps
        is_update_step = tf.equal((unwrap(self._iterations) + 1) % steps, 0)

        def step(var: Any, grad: Any, acc: Any) -> None:
            mean = (grad + tf.convert_to_tensor(acc)) / tf.cast(steps, grad.dtype)
            self.update_step(mean, var, self.learning_rate)

        def apply() -> None:
            for grad, var, acc in zip(grads, variables, accumulators, strict=True):
                distribution.extended.update(var, step, args=(grad, acc), group=False)
            # Automatic control dependencies order these writes after the reads above.
            for acc in accumulators:
                distribution.extended.update(acc, lambda a: a.assign(tf.zeros_like(a)), group=False)

        def accumulate() -> None:
            for grad, acc in zip(grads, accumulators, strict=True):
                distribution.extended.update(
                    acc, lambda a, g: a.assign_add(g), args=(grad,), group=False
                )

        tf.cond(is_update_step, apply, accumulate)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)
        return {**config, "accumulation_steps": self.accumulation_steps}
