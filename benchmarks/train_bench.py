"""Training benchmark: wall time per stage on a problem's full data, and the
model's eval metrics against a gradient-boosted-trees baseline on the same
split, scored by the same functions (``models.metrics``).

    python benchmarks/train_bench.py [--problem taxi|houses|exasens]
        [--input CSV]

Stages: ``analyze`` (parse + tf.Transform analyzers, a pipeline of its own),
``transform`` (parse + apply the transform, write TFRecords, a pipeline of its
own), ``preprocess`` (both in one pipeline, as ``pipelines.train`` runs them),
``train``, ``evaluate``, ``export``. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
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
from transforms import preprocessing  # noqa: E402
from transforms import records as R  # noqa: E402
from models import metrics as metrics_lib  # noqa: E402
from transforms import problem as problem_lib  # noqa: E402
from transforms.problem import DType, Kind, Task  # noqa: E402



def _timed(label, fn):
  print(f'[bench] {label} ...', file=sys.stderr, flush=True)
  start = time.monotonic()
  fn()
  seconds = time.monotonic() - start
  print(f'[bench] {label}: {seconds:.1f} s', file=sys.stderr, flush=True)
  return seconds


def _analyze_only(problem, input_pattern, out):
  with beam.Pipeline(options=PipelineOptions([])) as p:
    split = (p | 'ReadCsv' >> csv_io.ReadCsvRows(problem, input_pattern)
             | 'ParseAndSplit' >> train.ParseAndSplit(problem, 20))
    with tft_beam.Context(temp_dir=os.path.join(out, 'tmp')):
      transform_fn = (
          (split['train'] | train.ToRecordBatches(problem, 1024),
           columns.tensor_adapter_config(problem))
          | tft_beam.AnalyzeDataset(preprocessing.preprocessing_fn(problem)))
      _ = transform_fn | tft_beam.WriteTransformFn(
          os.path.join(out, 'transform'))


def _transform_only(problem, input_pattern, out):
  import tensorflow_transform as tft
  from tfx_bsl.public import tfxio
  schema = tft.TFTransformOutput(
      os.path.join(out, 'transform')).transformed_metadata.schema
  with beam.Pipeline(options=PipelineOptions([])) as p:
    split = (p | 'ReadCsv' >> csv_io.ReadCsvRows(problem, input_pattern)
             | 'ParseAndSplit' >> train.ParseAndSplit(problem, 20))
    transform_fn = p | tft_beam.ReadTransformFn(os.path.join(out, 'transform'))
    with tft_beam.Context(temp_dir=os.path.join(out, 'tmp')):
      for name in ('train', 'eval'):
        transformed = (
            ((split[name] | f'ToArrow{name}' >> train.ToRecordBatches(problem, 1024),
              columns.tensor_adapter_config(problem)), transform_fn)
            | f'Transform{name}' >> tft_beam.TransformDataset(
                output_record_batches=True))
        # ReadTransformFn yields plain metadata, so encode with the schema.
        _ = (transformed[0]
             | f'Encode{name}' >> beam.FlatMap(
                 lambda batch: tfxio.RecordBatchToExamplesEncoder(
                     schema).encode(batch[0]))
             | f'Write{name}' >> beam.io.WriteToTFRecord(
                 os.path.join(out, 'transformed', name)))


def _gbt_baseline(problem, input_path: str) -> dict:
  """sklearn gradient-boosted trees on the raw features, same split, scored
  with the same ``models.metrics`` as the model."""
  from sklearn.ensemble import (HistGradientBoostingClassifier,
                                HistGradientBoostingRegressor)
  features = problem.model_features
  categorical = [f.kind is Kind.CATEGORICAL or f.dtype is DType.STRING
                 for f in features]
  xs = {True: [], False: []}
  ys = {True: [], False: []}
  vocab: dict[str, dict] = {f.name: {} for f in features}
  for row in R.read_csv(problem, input_path):
    try:
      record = R.parse_csv_row(problem, row)
    except R.InvalidRecord:
      continue
    x = []
    for feature, is_cat in zip(features, categorical):
      v = record.values[feature.name]
      x.append(vocab[feature.name].setdefault(v, len(vocab[feature.name]))
               if is_cat else v)
    split = R.is_eval(R.record_key(problem, row), 20)
    xs[split].append(x)
    ys[split].append(R.label_value(problem, record))
  train_x = np.array(xs[False], dtype=float)
  eval_x = np.array(xs[True], dtype=float)
  train_y, eval_y = np.array(ys[False]), np.array(ys[True])
  kwargs = dict(categorical_features=np.array(categorical), random_state=0)
  start = time.monotonic()
  if problem.task is Task.REGRESSION:
    model = HistGradientBoostingRegressor(**kwargs)
    log = problem.label.log_target
    model.fit(train_x, np.log1p(train_y) if log else train_y)
    output = model.predict(eval_x)
    output = np.expm1(output) if log else output
  else:
    model = HistGradientBoostingClassifier(**kwargs)
    model.fit(train_x, train_y)
    output = model.predict_proba(eval_x)
    if problem.task is Task.BINARY:
      output = output[:, 1]
  seconds = time.monotonic() - start
  return {**metrics_lib.for_task(problem.task, eval_y, output,
                                 problem.label.threshold),
          'train_seconds': seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--problem', default='taxi')
  parser.add_argument('--input', default=None,
                      help='CSV data (default: the shipped problem\'s).')
  parser.add_argument('--skip_stages', action='store_true',
                      help='Only the full run and the baseline.')
  args = parser.parse_args()
  problem = problem_lib.load(args.problem)
  data = args.input or problem.data
  n_rows = sum(1 for _ in R.read_csv(problem, data))
  with tempfile.TemporaryDirectory() as tmp:
    stages = {} if args.skip_stages else {
        'analyze': _timed('analyze', lambda: _analyze_only(
            problem, data, os.path.join(tmp, 'a'))),
        'transform': _timed('transform', lambda: _transform_only(
            problem, data, os.path.join(tmp, 'a'))),
    }
    out = os.path.join(tmp, 'full')
    start = time.monotonic()
    print('[bench] full training run (pipelines.train) ...', file=sys.stderr,
          flush=True)
    # Keras prints its epochs on stdout, which carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
      metrics = train.run(['--problem', args.problem, '--input', data,
                           '--output_dir', out])
    total = time.monotonic() - start
  stages.update({k: v for k, v in metrics['seconds'].items()
                 if k != 'total'})
  print('[bench] gradient-boosted-trees baseline ...', file=sys.stderr,
        flush=True)
  baseline = _gbt_baseline(problem, data)
  headline, larger_is_better = metrics_lib.HEADLINE[problem.task]
  scores = {k: v for k, v in baseline.items() if k != 'train_seconds'}
  print(json.dumps({
      'problem': problem.name,
      'task': problem.task.value,
      'input': data,
      'rows': n_rows,
      'stage_seconds': {k: round(v, 2) for k, v in stages.items()},
      'training_run_seconds': round(total, 2),
      'rows_per_second': round(n_rows / total, 1),
      'peak_rss_mib': round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'model': {k: metrics[k] for k in list(scores) + ['n_train', 'n_eval',
                                                       'n_dead_letters']},
      'gbt_baseline': baseline,
      'headline': {'metric': headline, 'model': metrics[headline],
                   'gbt': baseline[headline],
                   'model_at_least_as_good': (
                       metrics[headline] >= baseline[headline]
                       if larger_is_better
                       else metrics[headline] <= baseline[headline])},
      'cpus': os.cpu_count(),
  }, indent=2))


if __name__ == '__main__':
  main()
