"""Real SavedModels that differ from a trained one in a known way, for the
serving-strategy tests: the same raw-feature signature around the trained
model's, with its answer changed (``invert``: 1 - p, a clearly worse model;
``sharpen``: p² / (p² + (1 - p)²), same class and more confident) or
delayed in the graph itself (``delay_ms``: a slow model, with no hook in the
serving code)."""

from __future__ import annotations

import tensorflow as tf

from models import export
from transforms.problem import Problem


def write_variant(problem: Problem, source: str, target: str,
                  change: str = 'none', delay_ms: float = 0.0) -> str:
  base = tf.saved_model.load(source)
  signature = base.signatures[export.SERVING_SIGNATURE]

  class Variant(tf.Module):

    def __init__(self):
      super().__init__()
      self.base = base

    @tf.function(input_signature=[export.raw_input_signature(problem)])
    def serve(self, raw):
      if delay_ms:
        # The sleep dataset waits once per element and once at its end.
        slept = tf.raw_ops.SleepDataset(
            input_dataset=tf.data.Dataset.range(1)._variant_tensor,  # pylint: disable=protected-access
            sleep_microseconds=tf.constant(int(delay_ms * 500), tf.int64),
            output_types=[tf.int64], output_shapes=[[]])
        done = tf.data.experimental.from_variant(
            slept, tf.TensorSpec([], tf.int64)).reduce(
                tf.constant(0, tf.int64), lambda a, b: a + b)
        with tf.control_dependencies([done]):
          raw = {k: tf.identity(v) for k, v in raw.items()}
      out = signature(**raw)
      p = out[export.PROBABILITY]
      if change == 'invert':
        p = 1.0 - p
      elif change == 'sharpen':
        p = p * p / (p * p + (1.0 - p) * (1.0 - p))
      elif change != 'none':
        raise ValueError(change)
      return {export.PROBABILITY: p,
              export.CLASS: tf.cast(p >= problem.label.threshold, tf.int64)}

  variant = Variant()
  tf.saved_model.save(variant, target, signatures={
      export.SERVING_SIGNATURE: variant.serve})
  return target
