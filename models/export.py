"""Export of a versioned SavedModel that takes *raw* features.

The ``serving_default`` signature takes one tensor per raw serving feature
(the problem's ``serving_features``: every raw feature but the label source),
runs the tf.Transform graph (``tft_layer``) and then the Keras model, and
returns, per task: binary, ``probability`` and ``class``; multi-class,
``probabilities`` (one per class, in the label's class order) and ``class``
(the index); regression, ``prediction`` (back on the label's scale when the
model was trained on a log target). A second signature,
``transform_features``, returns what the embedded transform computes, so the
train/serve parity of preprocessing can be checked on the exported artifact.

Versions follow the TF Serving layout: ``<model_root>/<integer>/``. A version
is written into a hidden temporary directory next to it and renamed into
place when complete, so a watcher never sees a half-written version, and a
new export never overwrites an old one.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import tensorflow as tf

from transforms.problem import Problem, Task

SERVING_SIGNATURE = 'serving_default'
TRANSFORM_SIGNATURE = 'transform_features'
PROBABILITY = 'probability'
PROBABILITIES = 'probabilities'
CLASS = 'class'
PREDICTION = 'prediction'
MODEL_INFO_FILE = 'model_info.json'  # in assets.extra, as TF Serving does
_VERSION_RE = re.compile(r'^\d+$')


def output_names(problem: Problem) -> tuple[str, ...]:
  """The serving signature's outputs for the problem's task."""
  return {Task.BINARY: (PROBABILITY, CLASS),
          Task.MULTICLASS: (PROBABILITIES, CLASS),
          Task.REGRESSION: (PREDICTION,)}[problem.task]


def outputs_from_model(problem: Problem, output: tf.Tensor
                       ) -> dict[str, tf.Tensor]:
  """The Keras model's output as the task's named serving outputs."""
  label = problem.label
  if problem.task is Task.BINARY:
    probability = tf.reshape(output, [-1])
    return {PROBABILITY: probability,
            CLASS: tf.cast(probability >= label.threshold, tf.int64)}
  if problem.task is Task.MULTICLASS:
    return {PROBABILITIES: output, CLASS: tf.argmax(output, axis=-1)}
  value = tf.reshape(output, [-1])
  return {PREDICTION: tf.math.expm1(value) if label.log_target else value}


def raw_input_signature(problem: Problem) -> dict[str, tf.TensorSpec]:
  spec = problem.raw_feature_spec(include_label=False)
  return {name: tf.TensorSpec([None], s.dtype, name=name)
          for name, s in spec.items()}


def list_versions(model_root: str) -> list[int]:
  """Integer versions present under ``model_root`` (complete or not)."""
  if not tf.io.gfile.isdir(model_root):
    return []
  return sorted(int(d.rstrip('/')) for d in tf.io.gfile.listdir(model_root)
                if _VERSION_RE.match(d.rstrip('/')))


def export_model(problem: Problem, model, tf_transform_output,
                 model_root: str, info: dict | None = None) -> tuple[int, str]:
  """Exports ``model`` with the transform graph inside as the next version.

  Returns:
    (version, path) of the exported SavedModel.
  """
  model.tft_layer = tf_transform_output.transform_features_layer()

  signature = raw_input_signature(problem)

  @tf.function(input_signature=[signature])
  def serve_raw(raw_features):
    transformed = model.tft_layer(raw_features)
    return outputs_from_model(problem, model(transformed))

  @tf.function(input_signature=[signature])
  def transform_features(raw_features):
    return model.tft_layer(raw_features)

  tf.io.gfile.makedirs(model_root)
  tmp = os.path.join(model_root, f'.tmp-{uuid.uuid4().hex}')
  model.save(tmp, save_format='tf', include_optimizer=False,
             signatures={SERVING_SIGNATURE: serve_raw,
                         TRANSFORM_SIGNATURE: transform_features})
  while True:
    version = (list_versions(model_root) or [0])[-1] + 1
    extra = os.path.join(tmp, 'assets.extra')
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, MODEL_INFO_FILE), 'w') as f:
      json.dump(dict(info or {}, version=version, problem=problem.name,
                     task=problem.task.value), f, indent=2)
    path = os.path.join(model_root, str(version))
    try:
      # Atomic on a local or POSIX file system; a concurrent export that took
      # this number first makes the rename fail and we take the next one.
      tf.io.gfile.rename(tmp, path, overwrite=False)
      return version, path
    except (tf.errors.OpError, OSError):
      if not tf.io.gfile.exists(path):
        raise
