"""The tf.Transform ``preprocessing_fn``: what the features become.

It loops over the problem's feature table; no feature name is typed here.
The same graph is analyzed and applied by the training pipeline and then
embedded in the exported model, so streaming serving never re-implements
preprocessing. The label is derived here too (``Label.tensor``): a rule, a
class index or a (log) target, present only when the label source is.

    fn = preprocessing.preprocessing_fn(problem.load('taxi'))
    tft_beam.AnalyzeAndTransformDataset(fn)
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import tensorflow as tf
import tensorflow_transform as tft

from transforms.problem import Feature, Kind, Problem, transformed_name


def _as_vocabulary_input(x: tf.Tensor) -> tf.Tensor:
  return x if x.dtype == tf.string else tf.strings.as_string(x)


def _preprocess(problem: Problem, inputs: Mapping[str, tf.Tensor]
                ) -> dict[str, tf.Tensor]:
  outputs: dict[str, tf.Tensor] = {}
  for feature in problem.model_features:
    x = inputs[feature.name]
    name = transformed_name(feature.name)
    if feature.kind is Kind.NUMERIC:
      outputs[name] = tft.scale_to_z_score(tf.cast(x, tf.float32))
    elif feature.kind is Kind.BUCKETIZED:
      outputs[name] = tft.bucketize(x, feature.buckets)
    elif feature.kind is Kind.CATEGORICAL:
      outputs[name] = tft.compute_and_apply_vocabulary(
          _as_vocabulary_input(x), top_k=problem.vocab_size,
          num_oov_buckets=problem.oov_buckets, vocab_filename=feature.name)
    elif feature.kind is Kind.IDENTITY:
      low, _ = feature.domain
      outputs[name] = tf.cast(x, tf.int64) - int(low)
    else:
      raise ValueError(f'no preprocessing for {feature.kind} ({feature.name})')
  if problem.label.column in inputs:
    outputs[problem.label.name] = problem.label.tensor(inputs)
  return outputs


def preprocessing_fn(problem: Problem
                     ) -> Callable[[Mapping[str, tf.Tensor]],
                                   dict[str, tf.Tensor]]:
  """The ``preprocessing_fn`` of ``problem``: raw dense features -> model inputs.

  Serving calls it without the label source; the label is then not produced.
  """
  return functools.partial(_preprocess, problem)


def cardinality(problem: Problem, feature: Feature,
                tf_transform_output) -> int:
  """Number of distinct ids a categorical-like transformed feature takes."""
  if feature.kind is Kind.BUCKETIZED:
    return feature.buckets
  if feature.kind is Kind.IDENTITY:
    low, high = feature.domain
    return int(high - low + 1)
  if feature.kind is Kind.CATEGORICAL:
    return tf_transform_output.vocabulary_size_by_name(
        feature.name) + problem.oov_buckets
  raise ValueError(f'{feature.name} is not categorical')
