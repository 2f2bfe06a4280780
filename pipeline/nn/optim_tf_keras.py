"""``AccumAdam`` for tf_keras: Adam with gradient accumulation, for effective batches
larger than memory allows.

The reference recipe trains with 8 accumulated batches of 16. ``AccumAdam`` sums the
(already replica-reduced) gradients of ``accumulation_steps`` consecutive
``apply_gradients`` calls and applies one ordinary Adam step with their mean on the
last of them; in between, the model weights, Adam's moments and ``iterations`` do not
change. ``iterations`` therefore counts applied Adam steps, which keeps Adam's bias
correction, and any learning-rate schedule, identical to training on the concatenated
batch: N accumulated steps of batch b equal one Adam step on batch N*b when the loss
is a mean over the batch (tests/unit/nn/test_optim.py proves it, also under
``MirroredStrategy``).

How it plugs into tf_keras: ``Optimizer.apply_gradients`` all-reduces the gradients
across replicas, then calls ``_distributed_apply_gradients_fn`` once, in cross-replica
context. Only that method is overridden: it adds the gradients to per-variable
accumulators and, under ``tf.cond`` on a micro-step counter, runs Adam's own
``update_step`` on the mean and clears the accumulators. Accumulators and counter are
optimizer variables, so ``tf.train.Checkpoint`` saves them and a resumed run continues
mid-accumulation.

Weight decay (AdamW, decoupled: ``w -= lr * weight_decay * w``) is applied by
``update_step``, so once per applied Adam step whatever the accumulation, before the
Adam update as in Keras' AdamW. ``scale_lr`` gives some variables (e.g. the encoder's)
a learning rate ``factor`` times the optimizer's; their decay scales with it, as in a
PyTorch parameter group.

Limits: gradient clipping and Keras' own EMA act on each micro-batch in tf_keras,
so they are rejected when ``accumulation_steps > 1`` (``callbacks.WeightAverage`` is
the EMA that works with accumulation). Under mixed precision the loss
scale optimizer counts a skipped (non-finite) micro-batch in ``iterations``; that only
shifts Adam's bias correction by one step. An accumulation that is still open at the
end of an epoch carries over into the next one.
"""

from typing import Any

from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.optim_factors import LrFactors


@keras.utils.register_keras_serializable(package="foldseg")
class AccumAdam(LrFactors, keras.optimizers.Adam):
    """Adam that applies one step per ``accumulation_steps`` calls, with the mean gradient.

    Takes the arguments of ``keras.optimizers.Adam`` plus ``accumulation_steps``; with
    ``accumulation_steps=1`` it is plain Adam. ``learning_rate`` (alias ``lr``) stays a
    variable that callbacks such as ReduceLROnPlateau can set.
    """

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
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            name=name,
            **kwargs,
        )
        self.accumulation_steps = accumulation_steps
        self._lr_factors: dict[str, float] = {}
        with tf.init_scope():
            # Micro-batches added to the accumulators since the last applied step.
            self._micro_step = tf.Variable(0, name="micro_step", dtype=tf.int64, trainable=False)
        self._variables.append(self._micro_step)

    @property
    def micro_step(self) -> tf.Variable:
        """int64 scalar variable: micro-batches accumulated since the last Adam step."""
        return self._micro_step

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        """Adam's dense step at this variable's learning rate, after its weight decay."""
        dtype = variable.dtype
        gradient = tf.convert_to_tensor(gradient)
        lr = self._decayed_lr(variable, self.learning_rate)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), local_step)
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon = self.epsilon
        if getattr(self, "adaptive_epsilon", False):
            epsilon = self.epsilon * tf.sqrt(1 - beta_2_power)
        m.assign_add((gradient - m) * (1 - self.beta_1))
        v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            v_hat.assign(tf.maximum(v_hat, v))
            v = v_hat
        variable.assign_sub((m * alpha) / (tf.sqrt(v) + epsilon))

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create Adam's moments and, when accumulating, one accumulator per variable."""
        super().build(var_list)
        if self.accumulation_steps == 1 or hasattr(self, "_accumulators"):
            return
        self._accumulators = []
        for var in var_list:
            self._accumulators.append(
                self.add_variable_from_reference(model_variable=var, variable_name="accumulator")
            )

    def _accumulator(self, variable: tf.Variable) -> tf.Variable:
        return self._accumulators[self._index_dict[self._var_key(variable)]]

    def _distributed_apply_gradients_fn(
        self, distribution: tf.distribute.Strategy, grads_and_vars: list, **kwargs: Any
    ) -> tf.Tensor:
        if self.accumulation_steps == 1:
            return super()._distributed_apply_gradients_fn(distribution, grads_and_vars, **kwargs)
        grads_and_vars = list(grads_and_vars)
        for grad, var in grads_and_vars:
            distribution.extended.update(
                self._accumulator(var), lambda acc, g: acc.assign_add(g), args=(grad,), group=False
            )
        self._micro_step.assign_add(1, read_value=False)
        steps = self.accumulation_steps

        def apply_mean_gradient(var: tf.Variable, acc: tf.Variable) -> None:
            mean_grad = tf.convert_to_tensor(acc) / tf.cast(steps, acc.dtype)
            if self.jit_compile:
                self._update_step_xla(mean_grad, var, id(self._var_key(var)))
            else:
                self._update_step(mean_grad, var)

        def apply_and_reset() -> None:
            for _, var in grads_and_vars:
                distribution.extended.update(
                    var, apply_mean_gradient, args=(self._accumulator(var),), group=False
                )
            # Automatic control dependencies order these writes after the reads above.
            for _, var in grads_and_vars:
                distribution.extended.update(
                    self._accumulator(var), lambda acc: acc.assign(tf.zeros_like(acc)), group=False
                )
            self._micro_step.assign(0, read_value=False)
            self.iterations.assign_add(1, read_value=False)

        tf.cond(
            tf.greater_equal(tf.convert_to_tensor(self._micro_step), steps),
            apply_and_reset,
            lambda: None,
        )
        return self.iterations

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "accumulation_steps": self.accumulation_steps}
