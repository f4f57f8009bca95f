"""The big-tipper classifier: a wide & deep ``tf_keras`` model.

It consumes the *transformed* features (``transforms.preprocessing``): z-scored
numerics feed the deep part directly; every categorical-like feature (vocabulary
ids, quantile buckets, identity ids) is embedded for the deep part and one-hot
encoded for the wide part. Inputs are derived from ``features.FEATURES``.

All hyper-parameters live in ``HParams``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tensorflow as tf
import tf_keras as keras

from transforms import features as F
from transforms import preprocessing


@dataclasses.dataclass(frozen=True)
class HParams:
  hidden_units: tuple[int, ...] = (128, 64)
  max_embedding_dim: int = 8
  dropout: float = 0.1
  learning_rate: float = 3e-3
  batch_size: int = 256
  # Chosen on the eval split of data/taxi_trips.csv: validation AUC peaks
  # after 2-3 epochs and declines after (over-fitting).
  epochs: int = 3
  seed: int = 42


def _embedding_dim(cardinality: int, hparams: HParams) -> int:
  # The usual rule of thumb: about the fourth root of the cardinality.
  return max(2, min(hparams.max_embedding_dim,
                    int(math.ceil(cardinality ** 0.25)) * 2))


def build_model(tf_transform_output, hparams: HParams = HParams()) -> keras.Model:
  """A compiled wide & deep model over the transformed features."""
  keras.utils.set_random_seed(hparams.seed)
  inputs: dict[str, Any] = {}
  deep: list[Any] = []
  wide: list[Any] = []
  for feature in F.model_features():
    name = F.transformed_name(feature.name)
    if feature.kind is F.Kind.NUMERIC:
      x = keras.layers.Input(shape=(), name=name, dtype=tf.float32)
      inputs[name] = x
      deep.append(keras.layers.Reshape((1,))(x))
      continue
    x = keras.layers.Input(shape=(), name=name, dtype=tf.int64)
    inputs[name] = x
    size = preprocessing.cardinality(feature, tf_transform_output)
    deep.append(keras.layers.Flatten()(keras.layers.Embedding(
        size, _embedding_dim(size, hparams), name=f'{name}_embedding')(
            keras.layers.Reshape((1,))(x))))
    wide.append(keras.layers.CategoryEncoding(
        num_tokens=size, output_mode='one_hot', name=f'{name}_onehot')(
            keras.layers.Reshape((1,))(x)))

  h = keras.layers.concatenate(deep)
  for units in hparams.hidden_units:
    h = keras.layers.Dense(units, activation='relu')(h)
    h = keras.layers.Dropout(hparams.dropout)(h)
  deep_logit = keras.layers.Dense(1)(h)
  wide_logit = keras.layers.Dense(1)(keras.layers.concatenate(wide))
  logit = keras.layers.add([deep_logit, wide_logit])
  probability = keras.layers.Activation('sigmoid', name='probability')(logit)
  model = keras.Model(inputs=inputs, outputs=probability)
  model.compile(
      optimizer=keras.optimizers.Adam(hparams.learning_rate),
      loss='binary_crossentropy',
      metrics=[keras.metrics.AUC(name='auc'),
               keras.metrics.BinaryAccuracy(name='accuracy')])
  return model


def transformed_dataset(file_pattern: str, tf_transform_output,
                        batch_size: int, shuffle: bool,
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
  ds = ds.map(lambda x: (x, x.pop(F.TRANSFORMED_LABEL_KEY)))
  return ds.prefetch(tf.data.AUTOTUNE)


def train(model: keras.Model, train_pattern: str, eval_pattern: str,
          tf_transform_output, hparams: HParams = HParams(),
          verbose: int = 2) -> keras.callbacks.History:
  """Fits the model on the transformed training data."""
  train_ds = transformed_dataset(train_pattern, tf_transform_output,
                                 hparams.batch_size, shuffle=True,
                                 seed=hparams.seed)
  eval_ds = transformed_dataset(eval_pattern, tf_transform_output,
                                hparams.batch_size, shuffle=False)
  return model.fit(train_ds, validation_data=eval_ds, epochs=hparams.epochs,
                   verbose=verbose)
