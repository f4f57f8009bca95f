"""The tf.Transform ``preprocessing_fn``: what the features become.

It loops over ``features.FEATURES``; no feature name is typed here. The same
graph is analyzed and applied by the training pipeline and then embedded in
the exported model, so streaming serving never re-implements preprocessing.
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_transform as tft

from transforms import features as F


def _as_vocabulary_input(x: tf.Tensor) -> tf.Tensor:
  return x if x.dtype == tf.string else tf.strings.as_string(x)


def preprocessing_fn(inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Maps raw dense features (``features.raw_feature_spec()``) to model inputs.

  Serving calls it without the label source; the label is then not produced.
  """
  outputs: dict[str, tf.Tensor] = {}
  for feature in F.model_features():
    x = inputs[feature.name]
    name = F.transformed_name(feature.name)
    if feature.kind is F.Kind.NUMERIC:
      outputs[name] = tft.scale_to_z_score(tf.cast(x, tf.float32))
    elif feature.kind is F.Kind.BUCKETIZED:
      outputs[name] = tft.bucketize(x, feature.buckets)
    elif feature.kind is F.Kind.CATEGORICAL:
      outputs[name] = tft.compute_and_apply_vocabulary(
          _as_vocabulary_input(x), top_k=F.VOCAB_SIZE,
          num_oov_buckets=F.OOV_BUCKETS, vocab_filename=feature.name)
    elif feature.kind is F.Kind.IDENTITY:
      low, _ = feature.domain
      outputs[name] = tf.cast(x, tf.int64) - low
    else:
      raise ValueError(f'no preprocessing for {feature.kind} ({feature.name})')
  if F.LABEL_KEY in inputs:
    tips = tf.cast(inputs[F.LABEL_KEY], tf.float32)
    fare = tf.cast(inputs[F.FARE_KEY], tf.float32)
    outputs[F.TRANSFORMED_LABEL_KEY] = tf.cast(
        tips > F.BIG_TIPPER_FRACTION * fare, tf.int64)
  return outputs


def cardinality(feature: F.Feature, tf_transform_output) -> int:
  """Number of distinct ids a categorical-like transformed feature takes."""
  if feature.kind is F.Kind.BUCKETIZED:
    return feature.buckets
  if feature.kind is F.Kind.IDENTITY:
    low, high = feature.domain
    return high - low + 1
  if feature.kind is F.Kind.CATEGORICAL:
    return tf_transform_output.vocabulary_size_by_name(
        feature.name) + F.OOV_BUCKETS
  raise ValueError(f'{feature.name} is not categorical')
