"""The training pipeline end to end on a few hundred real rows, and parity of
the exported raw-feature SavedModel with tf.Transform and the Keras model."""

import csv
import glob
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from models import export
from pipelines import train
from transforms import columns
from transforms import local
from transforms import records as R
from tests.taxi import TAXI

# Trains models and/or starts runner services.
pytestmark = pytest.mark.integration

N_ROWS = 400
BAD_ROWS = [
    {'fare': 'abc'},                 # wrong type
    {'payment_type': ''},            # required field empty
    {'trip_start_hour': '25'},       # out of domain
]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('train')
  with open('data/taxi_trips.csv', newline='') as f:
    reader = csv.DictReader(f)
    rows = list(itertools.islice(reader, N_ROWS))
    fieldnames = reader.fieldnames
  data = tmp / 'trips.csv'
  with open(data, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    writer.writerows(dict(rows[0], **bad) for bad in BAD_ROWS)
  out = str(tmp / 'out')
  metrics = train.run(['--input', str(data), '--output_dir', out,
                       '--epochs', '15'])
  return out, rows, metrics


def test_pipeline_writes_sane_artifacts(trained):
  out, rows, metrics = trained
  with open(os.path.join(out, 'metrics.json')) as f:
    assert json.load(f) == metrics
  assert metrics['n_train'] + metrics['n_eval'] == N_ROWS
  assert 0.1 * N_ROWS < metrics['n_eval'] < 0.3 * N_ROWS
  assert metrics['n_dead_letters'] == len(BAD_ROWS)
  assert 0.7 < metrics['auc'] <= 1.0  # a model that learned something
  assert 0.5 < metrics['accuracy'] <= 1.0
  assert 0.0 < metrics['log_loss'] < 1.0
  assert metrics['model_version'] == 1
  assert set(metrics['seconds']) == {'preprocess', 'train', 'evaluate',
                                     'export', 'total'}

  with open(os.path.join(out, 'stats.json')) as f:
    stats = json.load(f)
  assert stats['count'] == metrics['n_train']
  fare = stats['features']['fare']
  assert fare['missing'] == 0 and fare['min'] >= 0 and fare['std'] > 0
  payment = stats['features']['payment_type']
  assert payment['top_values'][0]['value'] in ('Cash', 'Credit Card')

  dead = [json.loads(line) for path in glob.glob(
      os.path.join(out, 'dead_letters', '*')) for line in open(path)]
  assert sorted(d['errors'][0]['field'] for d in dead) == sorted(
      next(iter(b)) for b in BAD_ROWS)
  assert all(d['errors'][0]['reason'] and d['source'] for d in dead)

  version_dir = os.path.join(out, 'model', '1')
  assert os.path.exists(os.path.join(version_dir, 'saved_model.pb'))
  with open(os.path.join(version_dir, 'assets.extra',
                         export.MODEL_INFO_FILE)) as f:
    assert json.load(f)['version'] == 1
  assert os.listdir(os.path.join(out, 'transform'))


def _eval_raw(rows):
  records = [R.parse_csv_row(TAXI, r, require_label=False) for r in rows
             if R.is_eval(R.record_key(TAXI, r), 20)]
  return {k: tf.constant(v) for k, v in
          columns.to_columns(TAXI, records).items()}


def test_exported_model_matches_transform_and_keras(trained):
  out, rows, _ = trained
  # A second export must not overwrite the first; keep its in-memory model.
  metrics, keras_model = train.train_and_export(TAXI, out, epochs=1, verbose=0)
  assert metrics['model_version'] == 2
  assert export.list_versions(os.path.join(out, 'model')) == [1, 2]

  raw = _eval_raw(rows)
  tft_output = local.load(os.path.join(out, 'transform'))
  expected_features = tft_output.transform_raw_features(raw)
  saved = tf.saved_model.load(metrics['model_path'])
  inside_features = saved.signatures[export.TRANSFORM_SIGNATURE](**raw)
  assert set(inside_features) == set(expected_features)
  for name, value in expected_features.items():
    np.testing.assert_allclose(inside_features[name].numpy(), value.numpy(),
                               atol=1e-6, err_msg=name)

  served = saved.signatures[export.SERVING_SIGNATURE](**raw)
  keras_probability = keras_model(dict(expected_features)).numpy().reshape(-1)
  np.testing.assert_allclose(served[export.PROBABILITY].numpy(),
                             keras_probability, atol=1e-6)
  np.testing.assert_array_equal(served[export.CLASS].numpy(),
                                (keras_probability > 0.5).astype(np.int64))
  # The signature takes raw features only: no label, no transformed names.
  inputs = saved.signatures[export.SERVING_SIGNATURE].structured_input_signature
  assert set(inputs[1]) == {f.name for f in TAXI.serving_features}


def test_notebook_helpers_transform_dicts_and_dataframes(trained):
  import pandas as pd
  out, rows, _ = trained
  tft_output = local.load(os.path.join(out, 'transform'))
  from_rows = local.transform_rows(TAXI, tft_output, rows[:5], from_csv=True)
  frame = pd.read_csv('data/taxi_trips.csv', nrows=5)
  from_frame = local.transform_dataframe(TAXI, tft_output, frame)
  for name, value in from_rows.items():
    np.testing.assert_allclose(from_frame[name], value, atol=1e-6)
  with pytest.raises(R.InvalidRecord):
    local.transform_rows(TAXI, tft_output, [dict(rows[0], fare='x')], from_csv=True)
