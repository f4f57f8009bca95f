"""A wide & deep ``tf_keras`` model for any problem, with a head per task.

It consumes the *transformed* features (``transforms.preprocessing``): z-scored
numerics feed the deep part directly; every categorical-like feature (vocabulary
ids, quantile buckets, identity ids) is embedded for the deep part and one-hot
encoded for the wide part. Inputs are derived from the problem's feature table.

Heads: binary, a sigmoid ``probability`` (binary cross-entropy); multi-class,
softmax ``probabilities`` (sparse categorical cross-entropy); regression, a
linear ``prediction`` (mean squared error, on log(1 + y) when the label says
``log_target``).

All hyper-parameters live in ``HParams``; a problem may override them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tensorflow as tf
import tf_keras as keras

from transforms import preprocessing
from transforms.problem import Kind, Problem, Task, transformed_name


@dataclasses.dataclass(frozen=True)
class HParams:
  hidden_units: tuple[int, ...] = (128, 64)
  max_embedding_dim: int = 8
  dropout: float = 0.1
  learning_rate: float = 3e-3
  batch_size: int = 256
  epochs: int = 3
  seed: int = 42

  @classmethod
  def for_problem(cls, problem: Problem, **overrides) -> 'HParams':
    """Defaults, then the problem's ``hparams``, then ``overrides``."""
    given = {**problem.hparams,
             **{k: v for k, v in overrides.items() if v is not None}}
    if 'hidden_units' in given:
      given['hidden_units'] = tuple(given['hidden_units'])
    return cls(**given)


def _embedding_dim(cardinality: int, hparams: HParams) -> int:
  # The usual rule of thumb: about the fourth root of the cardinality.
  return max(2, min(hparams.max_embedding_dim,
                    int(math.ceil(cardinality ** 0.25)) * 2))


def _head(problem: Problem) -> tuple[int, str, Any, list[Any]]:
  """(units, activation, loss, metrics) of the task's output layer."""
  task = problem.task
  if task is Task.BINARY:
    return 1, 'sigmoid', 'binary_crossentropy', [
        keras.metrics.AUC(name='auc'),
        keras.metrics.BinaryAccuracy(name='accuracy')]
  if task is Task.MULTICLASS:
    return problem.label.n_classes, 'softmax', (
        'sparse_categorical_crossentropy'), [
            keras.metrics.SparseCategoricalAccuracy(name='accuracy')]
  return 1, 'linear', 'mean_squared_error', [
      keras.metrics.MeanAbsoluteError(name='mae')]


def build_model(problem: Problem, tf_transform_output,
                hparams: HParams = HParams(),
                target_mean: float = 0.0) -> keras.Model:
  """A compiled wide & deep model over the transformed features.

  ``target_mean``: a regression's output starts at the mean training target
  (``label_mean``), so the first epochs learn the features, not the scale.
  """
  keras.utils.set_random_seed(hparams.seed)
  inputs: dict[str, Any] = {}
  deep: list[Any] = []
  wide: list[Any] = []
  for feature in problem.model_features:
    name = transformed_name(feature.name)
    if feature.kind is Kind.NUMERIC:
      x = keras.layers.Input(shape=(), name=name, dtype=tf.float32)
      inputs[name] = x
      deep.append(keras.layers.Reshape((1,))(x))
      continue
    x = keras.layers.Input(shape=(), name=name, dtype=tf.int64)
    inputs[name] = x
    size = preprocessing.cardinality(problem, feature, tf_transform_output)
    deep.append(keras.layers.Flatten()(keras.layers.Embedding(
        size, _embedding_dim(size, hparams), name=f'{name}_embedding')(
            keras.layers.Reshape((1,))(x))))
    wide.append(keras.layers.CategoryEncoding(
        num_tokens=size, output_mode='one_hot', name=f'{name}_onehot')(
            keras.layers.Reshape((1,))(x)))

  units, activation, loss, metrics = _head(problem)
  h = keras.layers.concatenate(deep) if len(deep) > 1 else deep[0]
  for width in hparams.hidden_units:
    h = keras.layers.Dense(width, activation='relu')(h)
    h = keras.layers.Dropout(hparams.dropout)(h)
  logit = keras.layers.Dense(
      units, bias_initializer=keras.initializers.Constant(target_mean))(h)
  if wide:
    wide_in = keras.layers.concatenate(wide) if len(wide) > 1 else wide[0]
    logit = keras.layers.add([logit, keras.layers.Dense(units)(wide_in)])
  output = keras.layers.Activation(activation, name='output')(logit)
  model = keras.Model(inputs=inputs, outputs=output)
  model.compile(optimizer=keras.optimizers.Adam(hparams.learning_rate),
                loss=loss, metrics=metrics)
  return model


def transformed_dataset(problem: Problem, file_pattern: str,
                        tf_transform_output, batch_size: int, shuffle: bool,
                        seed: int = 42) -> tf.data.Dataset:
  """(features, label) batches from transformed tf.Example TFRecords."""
  spec = tf_transform_output.transformed_feature_spec()
  files = tf.io.gfile.glob(file_pattern)
  if not files:
    raise FileNotFoundError(f'no transformed data matches {file_pattern}')
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP')
  if shuffle:
    ds = ds.shuffle(50_000, seed=seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch_size).map(
      lambda x: tf.io.parse_example(x, spec),
      num_parallel_calls=tf.data.AUTOTUNE)
  label = problem.label.name
  ds = ds.map(lambda x: (x, x.pop(label)))
  return ds.prefetch(tf.data.AUTOTUNE)


def label_mean(problem: Problem, file_pattern: str,
               tf_transform_output) -> float:
  """Mean of the transformed label over the data (regression bias init)."""
  import numpy as np
  total, count = 0.0, 0
  for _, label in transformed_dataset(problem, file_pattern,
                                      tf_transform_output, 4096,
                                      shuffle=False):
    values = label.numpy().astype(np.float64)
    total += values.sum()
    count += len(values)
  return total / count if count else 0.0


def train(problem: Problem, model: keras.Model, train_pattern: str,
          eval_pattern: str, tf_transform_output,
          hparams: HParams = HParams(),
          verbose: int = 2) -> keras.callbacks.History:
  """Fits the model on the transformed training data."""
  train_ds = transformed_dataset(problem, train_pattern, tf_transform_output,
                                 hparams.batch_size, shuffle=True,
                                 seed=hparams.seed)
  eval_ds = transformed_dataset(problem, eval_pattern, tf_transform_output,
                                hparams.batch_size, shuffle=False)
  return model.fit(train_ds, validation_data=eval_ds, epochs=hparams.epochs,
                   verbose=verbose)


def evaluate(problem: Problem, model: keras.Model,
             dataset: tf.data.Dataset) -> dict[str, Any]:
  """The task's metrics (``models.metrics``) of ``model`` on ``dataset``.

  A regression trained on a log target is measured on the label's own
  scale, as its serving signature answers.
  """
  import numpy as np
  from models import metrics
  outputs, labels = [], []
  for features, label in dataset:
    outputs.append(model(features, training=False).numpy())
    labels.append(label.numpy())
  output = np.concatenate(outputs)
  y = np.concatenate(labels)
  if problem.task is Task.REGRESSION and problem.label.log_target:
    output, y = np.expm1(output), np.expm1(y)
  return metrics.for_task(problem.task, y, output, problem.label.threshold)
