"""Training benchmark: wall time per stage on the full taxi data, and the
model's AUC against a gradient-boosted-trees baseline on the same split.

    python benchmarks/train_bench.py [--input data/taxi_trips.csv]

Stages: ``analyze`` (parse + tf.Transform analyzers, a pipeline of its own),
``transform`` (parse + apply the transform, write TFRecords, a pipeline of its
own), ``preprocess`` (both in one pipeline, as ``pipelines.train`` runs them),
``train``, ``evaluate``, ``export``. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_transform.beam as tft_beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from pipelines import train  # noqa: E402
from transforms import columns  # noqa: E402
from transforms import csv_io  # noqa: E402
from transforms import features as F  # noqa: E402
from transforms import preprocessing  # noqa: E402
from transforms import records as R  # noqa: E402
from transforms import problem as problem_lib

TAXI = problem_lib.load('taxi')


def _timed(label, fn):
  print(f'[bench] {label} ...', file=sys.stderr, flush=True)
  start = time.monotonic()
  fn()
  seconds = time.monotonic() - start
  print(f'[bench] {label}: {seconds:.1f} s', file=sys.stderr, flush=True)
  return seconds


def _analyze_only(input_pattern, out):
  with beam.Pipeline(options=PipelineOptions([])) as p:
    split = (p | 'ReadCsv' >> csv_io.ReadCsvRows(input_pattern)
             | 'ParseAndSplit' >> train.ParseAndSplit(20))
    with tft_beam.Context(temp_dir=os.path.join(out, 'tmp')):
      transform_fn = (
          (split['train'] | train.ToRecordBatches(1024),
           columns.tensor_adapter_config(TAXI))
          | tft_beam.AnalyzeDataset(preprocessing.preprocessing_fn(TAXI)))
      _ = transform_fn | tft_beam.WriteTransformFn(
          os.path.join(out, 'transform'))


def _transform_only(input_pattern, out):
  import tensorflow_transform as tft
  from tfx_bsl.public import tfxio
  schema = tft.TFTransformOutput(
      os.path.join(out, 'transform')).transformed_metadata.schema
  with beam.Pipeline(options=PipelineOptions([])) as p:
    split = (p | 'ReadCsv' >> csv_io.ReadCsvRows(input_pattern)
             | 'ParseAndSplit' >> train.ParseAndSplit(20))
    transform_fn = p | tft_beam.ReadTransformFn(os.path.join(out, 'transform'))
    with tft_beam.Context(temp_dir=os.path.join(out, 'tmp')):
      for name in ('train', 'eval'):
        transformed = (
            ((split[name] | f'ToArrow{name}' >> train.ToRecordBatches(1024),
              columns.tensor_adapter_config(TAXI)), transform_fn)
            | f'Transform{name}' >> tft_beam.TransformDataset(
                output_record_batches=True))
        # ReadTransformFn yields plain metadata, so encode with the schema.
        _ = (transformed[0]
             | f'Encode{name}' >> beam.FlatMap(
                 lambda batch: tfxio.RecordBatchToExamplesEncoder(
                     schema).encode(batch[0]))
             | f'Write{name}' >> beam.io.WriteToTFRecord(
                 os.path.join(out, 'transformed', name)))


def _gbt_baseline(input_path: str) -> dict:
  """sklearn gradient-boosted trees on the raw features, same split."""
  from sklearn.ensemble import HistGradientBoostingClassifier
  from sklearn.metrics import roc_auc_score
  names = [f.name for f in TAXI.model_features]
  categorical = [f.kind is Kind.CATEGORICAL for f in TAXI.model_features]
  xs = {True: [], False: []}
  ys = {True: [], False: []}
  vocab: dict[str, dict] = {n: {} for n in names}
  for row in R.read_csv(TAXI, input_path):
    try:
      record = R.parse_csv_row(TAXI, row)
    except R.InvalidRecord:
      continue
    features = []
    for name, is_cat in zip(names, categorical):
      v = record.values[name]
      features.append(vocab[name].setdefault(v, len(vocab[name])) if is_cat
                      else v)
    split = R.is_eval(R.record_key(TAXI, row), 20)
    xs[split].append(features)
    ys[split].append(F.is_big_tipper(record.values[TAXI.label.column],
                                     record.values['fare']))
  model = HistGradientBoostingClassifier(
      categorical_features=np.array(categorical), random_state=0)
  start = time.monotonic()
  model.fit(np.array(xs[False], dtype=float), np.array(ys[False]))
  seconds = time.monotonic() - start
  auc = roc_auc_score(ys[True],
                      model.predict_proba(np.array(xs[True], dtype=float))[:, 1])
  return {'auc': float(auc), 'train_seconds': seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--input', default='data/taxi_trips.csv')
  args = parser.parse_args()
  n_rows = sum(1 for _ in R.read_csv(TAXI, args.input))
  with tempfile.TemporaryDirectory() as tmp:
    stages = {
        'analyze': _timed('analyze', lambda: _analyze_only(
            args.input, os.path.join(tmp, 'a'))),
        'transform': _timed('transform', lambda: _transform_only(
            args.input, os.path.join(tmp, 'a'))),
    }
    out = os.path.join(tmp, 'full')
    start = time.monotonic()
    print('[bench] full training run (pipelines.train) ...', file=sys.stderr,
          flush=True)
    metrics = train.run(['--input', args.input, '--output_dir', out])
    total = time.monotonic() - start
  stages.update({k: v for k, v in metrics['seconds'].items()
                 if k != 'total'})
  print('[bench] gradient-boosted-trees baseline ...', file=sys.stderr,
        flush=True)
  baseline = _gbt_baseline(args.input)
  print(json.dumps({
      'input': args.input,
      'rows': n_rows,
      'stage_seconds': {k: round(v, 2) for k, v in stages.items()},
      'training_run_seconds': round(total, 2),
      'rows_per_second': round(n_rows / total, 1),
      'preprocess_rows_per_second': round(n_rows / stages['preprocess'], 1),
      'peak_rss_mib': round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'model': {k: metrics[k] for k in ('auc', 'accuracy', 'log_loss',
                                        'n_train', 'n_eval')},
      'gbt_baseline': baseline,
      'cpus': os.cpu_count(),
  }, indent=2))


if __name__ == '__main__':
  main()
