"""Batch training: CSV → tf.Transform → Keras → versioned raw-feature SavedModel.

For any problem (``--problem``, default the shipped taxi trips):

Stages:
  1. a Beam pipeline reads CSV files, parses and validates every row with
     ``transforms.records`` (invalid rows go to ``OUT/dead_letters/`` with
     reasons and a counter), splits train/eval by a hash of the row, runs
     ``AnalyzeAndTransformDataset`` on train and ``TransformDataset`` on eval
     (Arrow RecordBatches via TFXIO), and writes the transformed TFRecords,
     ``OUT/transform/`` and the training statistics ``OUT/stats.json``
     (and as TFDV's ``DatasetFeatureStatisticsList``, ``OUT/stats.tfdv.pb``,
     for Facets);
  2. the Keras model (a head for the problem's task) trains on the
     transformed TFRecords and is evaluated on the eval split with the
     task's metrics (``models.metrics``);
  3. the model is exported with the transform graph inside as
     ``OUT/model/<version>/`` and ``OUT/metrics.json`` is written.

Run it locally (DirectRunner)::

    python -m pipelines.train --input 'data/taxi_trips.csv' --output_dir out
    python -m pipelines.train --problem houses --input data/houses.csv \
        --output_dir out/houses

or, unchanged, on another runner chosen by flags::

    python -m pipelines.train --input 'data/*.csv' --output_dir out \\
        --runner prism
    python -m pipelines.train --input 'gs://b/data/*.csv' \\
        --output_dir gs://b/out --runner dataflow --project P --region R \\
        --temp_location gs://b/tmp

Or from a bounded range of a Kafka topic, in any event format
(``transforms.formats``), through the same decoder and dead-letter path as
serving; the split key then hashes the record's typed values, so the same
rows split alike whatever format they came in::

    python -m pipelines.train --problem hcopd --input_topic hcopd-data \
        --input_format avro --from_offsets '{"0": 0}' --to_offsets '{"0": 239}' \
        --output_dir out/hcopd [--model_topic hcopd-models --publish_state live]

(``--from_time``/``--to_time`` instead of offsets; neither: the whole topic
up to now). ``--model_topic`` publishes the exported version to the model
registry (``models.registry``).

Model training (stage 2) runs in the launching process, as the TFX Trainer
runs after Transform; the Beam stage is what scales out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Union

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import TestOptions

from models import registry
from runners import options as runner_options
from transforms import columns
from transforms import csv_io
from transforms import decode
from transforms import enrichment
from transforms import formats
from transforms import kafka_io
from transforms import problem as problem_lib
from transforms import records as R
from transforms import stats as feature_stats
from transforms.problem import Problem, Task

TRAIN_PREFIX = 'transformed/train'
EVAL_PREFIX = 'transformed/eval'


class TrainOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    # Not argparse-required: Beam parses every registered options class from
    # sys.argv whenever any PipelineOptions is built in this process.
    parser.add_argument('--input',
                        help='CSV file pattern (local or gs://); default: '
                        'the problem\'s own data file, if it ships one.')
    parser.add_argument('--output_dir',
                        help='Where transform/, model/, metrics.json go.')
    parser.add_argument('--eval_percent', type=int, default=20,
                        help='Share of rows (by row hash) held out for eval.')
    parser.add_argument('--epochs', type=int, default=None,
                        help='Training epochs (default: the problem\'s, '
                        'else models.model.HParams).')
    parser.add_argument('--batch_size', type=int, default=1024,
                        help='Rows per Arrow RecordBatch fed to tf.Transform.')
    # Training from a topic (--input_topic, a Kafka flag; --input_format).
    parser.add_argument('--from_offsets', default=None,
                        help='With --input_topic: first offset to read, one '
                        'for every partition (e.g. 0) or JSON {"partition": '
                        'offset}. Default: the start of the topic.')
    parser.add_argument('--to_offsets', default=None,
                        help='With --input_topic: stop before these offsets '
                        '(same forms). Default: the end at launch.')
    parser.add_argument('--from_time', default=None,
                        help='With --input_topic: first record appended at '
                        'or after this time (epoch ms or ISO-8601 UTC).')
    parser.add_argument('--to_time', default=None,
                        help='With --input_topic: stop before the first '
                        'record appended at or after this time.')


class ParseAndSplit(beam.PTransform):
  """Rows → train records, eval records and dead letters."""

  def __init__(self, problem: Problem, eval_percent: int):
    super().__init__()
    self._problem = problem
    self._eval_percent = eval_percent

  def expand(self, rows):
    parsed = rows | 'ParseRows' >> beam.ParDo(
        csv_io.ParseRow(self._problem)).with_outputs(
            csv_io.ParseRow.DEAD_LETTER, main='records')
    split = parsed.records | 'SplitTrainEval' >> SplitTrainEval(
        self._eval_percent)
    return dict(split, dead_letters=parsed[csv_io.ParseRow.DEAD_LETTER])


class SplitTrainEval(beam.PTransform):
  """(record key, Record) → {'train', 'eval'} by a hash of the key."""

  def __init__(self, eval_percent: int):
    super().__init__()
    self._eval_percent = eval_percent

  def expand(self, keyed):
    train, evaluation = keyed | 'Split' >> beam.Partition(
        lambda kv, _: int(R.is_eval(kv[0], self._eval_percent)), 2)
    return {'train': train | 'DropTrainKeys' >> beam.Values(),
            'eval': evaluation | 'DropEvalKeys' >> beam.Values()}


@dataclasses.dataclass(frozen=True)
class TopicRange:
  """A bounded range of a Kafka topic to train on (``--input_topic``)."""
  bootstrap_servers: str
  topic: str
  event_format: formats.EventFormat = formats.EventFormat()
  start_offsets: Any = None
  stop_offsets: Any = None
  start_timestamp_ms: Optional[int] = None
  stop_timestamp_ms: Optional[int] = None
  consumer_config: Optional[dict] = None

  def describe(self) -> str:
    start = (self.start_offsets if self.start_offsets is not None
             else self.start_timestamp_ms or 'the start')
    stop = (self.stop_offsets if self.stop_offsets is not None
            else self.stop_timestamp_ms or 'the end at launch')
    return (f'{self.topic} ({self.event_format.name}) from {start} to '
            f'{stop}')


def _offsets(text: Optional[str], topic: str) -> Any:
  if text is None:
    return None
  value = json.loads(text)
  if isinstance(value, int):
    return value
  return {(topic, int(p)): int(o) for p, o in value.items()}


def _epoch_ms(text: Optional[str]) -> Optional[int]:
  if text is None:
    return None
  if text.lstrip('-').isdigit():
    return int(text)
  import datetime
  moment = datetime.datetime.fromisoformat(text.replace('Z', '+00:00'))
  if moment.tzinfo is None:
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return int(moment.timestamp() * 1000)


def topic_range(options: PipelineOptions, problem: Problem
                ) -> Optional[TopicRange]:
  """The topic range the flags name, or None (training from files)."""
  kafka = options.view_as(kafka_io.KafkaOptions)
  if not kafka.input_topic:
    return None
  flags = options.view_as(TrainOptions)
  return TopicRange(
      kafka_io.bootstrap_servers(options), kafka.input_topic,
      formats.EventFormat.from_options(options, problem),
      _offsets(flags.from_offsets, kafka.input_topic),
      _offsets(flags.to_offsets, kafka.input_topic),
      _epoch_ms(flags.from_time), _epoch_ms(flags.to_time),
      dict(kafka.consumer_config))


class ReadTopicRecords(beam.PTransform):
  """A bounded topic range → (record key, Record) and dead letters.

  The same decoder and validation as serving (``decode.DecodeEvents``,
  labels required). The split key hashes the record's typed values, so the
  same rows split the same way whatever format they came in.
  """

  def __init__(self, problem: Problem, source: TopicRange):
    super().__init__()
    self._problem = problem
    self._source = source

  def expand(self, pbegin):
    src, problem = self._source, self._problem
    decoded = (
        pbegin
        | 'ReadTopic' >> kafka_io.ReadFromKafka(
            src.bootstrap_servers, src.topic, commit_offsets=False,
            start_offsets=src.start_offsets,
            stop_offsets=src.stop_offsets,
            start_timestamp_ms=src.start_timestamp_ms,
            stop_timestamp_ms=src.stop_timestamp_ms, bounded=True,
            consumer_config=src.consumer_config or {})
        | 'DecodeEvents' >> decode.DecodeEvents(
            problem, require_label=True, event_format=src.event_format))
    keyed = decoded.records | 'KeyByValues' >> beam.Map(
        lambda r: (R.record_key(problem, r.values), r))
    return {'records': keyed, 'dead_letters': decoded.dead_letters}


class ToRecordBatches(beam.PTransform):
  """Records → Arrow RecordBatches in the TFXIO layout."""

  def __init__(self, problem: Problem, batch_size: int):
    super().__init__()
    self._problem = problem
    self._batch_size = batch_size

  def expand(self, records):
    problem = self._problem
    return (records
            | 'Batch' >> beam.BatchElements(
                min_batch_size=self._batch_size,
                max_batch_size=self._batch_size)
            | 'ToArrow' >> beam.Map(
                lambda batch: columns.to_record_batch(problem, batch)))


class WriteJson(beam.PTransform):
  """One JSON document → one file (``stats.json`` and the like)."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, pcoll):
    return (pcoll
            | 'Dump' >> beam.Map(json.dumps, indent=2, sort_keys=True)
            | 'Write' >> beam.io.WriteToText(
                self._path, shard_name_template='', num_shards=1))


def _enrichment_dead_letter(record, errors):
  return {'source': record.event_id, 'row': record.values, 'errors': errors,
          'stage': 'Enrich'}


def _enriched(problem: Problem, split: dict, sources: dict) -> dict:
  """Train and eval records with their reference fields joined
  (``transforms.enrichment``, the join serving does), dead letters added."""
  out = {}
  letters = [split['dead_letters']]
  for name in ('train', 'eval'):
    joined = split[name] | f'Enrich{name.capitalize()}' >> beam.ParDo(
        enrichment.Enrich(problem, sources, _enrichment_dead_letter)
    ).with_outputs(enrichment.Enrich.DEAD_LETTERS, main='records')
    out[name] = joined.records
    letters.append(joined[enrichment.Enrich.DEAD_LETTERS]
                   | f'Jsonable{name.capitalize()}Letters' >> beam.Map(
                       lambda d: json.loads(json.dumps(d, default=str))))
  out['dead_letters'] = tuple(letters) | 'MergeDeadLetters' >> beam.Flatten()
  return out


def build_preprocessing(pipeline: beam.Pipeline, problem: Problem,
                        source: Union[str, TopicRange], output_dir: str,
                        eval_percent: int = 20,
                        batch_size: int = 1024,
                        references: Optional[dict] = None) -> None:
  """Adds stage 1 (parse, [join references,] split, analyze, transform,
  write) to ``pipeline``; ``source`` is a CSV file pattern or a topic range;
  ``references``: reference table -> source (``enrichment.sources``)."""
  import tensorflow_transform.beam as tft_beam
  from transforms import preprocessing

  if isinstance(source, TopicRange):
    read = pipeline | 'ReadTopicRecords' >> ReadTopicRecords(problem, source)
    split = dict(read['records'] | 'SplitTrainEval' >> SplitTrainEval(
        eval_percent), dead_letters=read['dead_letters'])
  else:
    split = (pipeline
             | 'ReadCsv' >> csv_io.ReadCsvRows(problem, source)
             | 'ParseAndSplit' >> ParseAndSplit(problem, eval_percent))
  if problem.references:
    split = _enriched(problem, split, references or {})
  _ = (split['dead_letters']
       | 'DumpDeadLetters' >> beam.Map(json.dumps)
       | 'WriteDeadLetters' >> beam.io.WriteToText(
           os.path.join(output_dir, 'dead_letters', 'rows'),
           file_name_suffix='.jsonl'))
  stats = split['train'] | 'ComputeStats' >> (
      feature_stats.ComputeFeatureStats(problem))
  _ = stats | 'WriteStats' >> WriteJson(os.path.join(output_dir, 'stats.json'))
  # The same statistics in TFDV's format, for Facets.
  _ = stats | 'WriteTfdvStats' >> beam.Map(
      lambda s: feature_stats.write_feature_statistics(
          problem, s, os.path.join(output_dir, 'stats.tfdv.pb')))

  adapter_config = columns.tensor_adapter_config(problem)
  with tft_beam.Context(temp_dir=os.path.join(output_dir, 'tmp', 'tft')):
    train_batches = split['train'] | 'TrainToArrow' >> ToRecordBatches(
        problem, batch_size)
    eval_batches = split['eval'] | 'EvalToArrow' >> ToRecordBatches(
        problem, batch_size)
    (transformed_train, transformed_metadata), transform_fn = (
        (train_batches, adapter_config)
        | 'AnalyzeAndTransform' >> tft_beam.AnalyzeAndTransformDataset(
            preprocessing.preprocessing_fn(problem),
            output_record_batches=True))
    transformed_eval, _ = (
        ((eval_batches, adapter_config), transform_fn)
        | 'TransformEval' >> tft_beam.TransformDataset(
            output_record_batches=True))
    for name, data, prefix in (('Train', transformed_train, TRAIN_PREFIX),
                               ('Eval', transformed_eval, EVAL_PREFIX)):
      _ = ((data, transformed_metadata)
           | f'Encode{name}' >> tft_beam.EncodeTransformedDataset()
           | f'Write{name}' >> beam.io.WriteToTFRecord(
               os.path.join(output_dir, prefix), file_name_suffix='.gz'))
    _ = transform_fn | 'WriteTransformFn' >> tft_beam.WriteTransformFn(
        os.path.join(output_dir, 'transform'))


def _counter(result, name: str,
             namespace: str = csv_io.METRICS_NAMESPACE) -> int:
  found = result.metrics().query(
      MetricsFilter().with_namespace(namespace).with_name(name))
  return int(sum(c.committed or 0 for c in found['counters']))


def train_and_export(problem: Problem, output_dir: str,
                     epochs: int | None = None,
                     verbose: int = 2) -> tuple[dict[str, Any], Any]:
  """Stages 2 and 3: trains, evaluates and exports.

  Returns:
    (metrics, the trained in-memory Keras model): the task's eval metrics
    (``models.metrics``), the model version and path, seconds per stage.
  """
  import tensorflow_transform as tft
  from models import export
  from models import model as model_lib

  hparams = model_lib.HParams.for_problem(problem, epochs=epochs)
  tft_output = tft.TFTransformOutput(os.path.join(output_dir, 'transform'))
  timings = {}
  start = time.monotonic()
  train_pattern = os.path.join(output_dir, TRAIN_PREFIX + '*')
  target_mean = (model_lib.label_mean(problem, train_pattern, tft_output)
                 if problem.task is Task.REGRESSION else 0.0)
  model = model_lib.build_model(problem, tft_output, hparams, target_mean)
  model_lib.train(problem, model, os.path.join(output_dir, TRAIN_PREFIX + '*'),
                  os.path.join(output_dir, EVAL_PREFIX + '*'), tft_output,
                  hparams, verbose=verbose)
  timings['train'] = time.monotonic() - start

  start = time.monotonic()
  eval_ds = model_lib.transformed_dataset(
      problem, os.path.join(output_dir, EVAL_PREFIX + '*'), tft_output,
      hparams.batch_size, shuffle=False)
  scores = model_lib.evaluate(problem, model, eval_ds)
  timings['evaluate'] = time.monotonic() - start

  start = time.monotonic()
  version, path = export.export_model(
      problem, model, tft_output, os.path.join(output_dir, 'model'),
      info={'eval': scores, 'hparams': dataclasses.asdict(hparams)})
  timings['export'] = time.monotonic() - start
  logging.info('Exported model version %d to %s', version, path)
  return {'problem': problem.name, 'task': problem.task.value, **scores,
          'model_version': version, 'model_path': path,
          'seconds': timings}, model


def publish_model(problem: Problem, options: PipelineOptions,
                  path: str) -> Optional[dict[str, Any]]:
  """With ``--model_topic``: announces the exported version on the model
  registry (``--publish_state`` candidate or live; promoting it retires the
  live one), so serving jobs that follow the registry pick it up."""
  kafka = options.view_as(kafka_io.KafkaOptions)
  if not kafka.model_topic:
    return None
  flags = options.view_as(registry.RegistryOptions)
  bootstrap = kafka_io.bootstrap_servers(options)
  descriptor = registry.describe(problem, path, flags.model_name)
  registry.ensure_topic(bootstrap, kafka.model_topic, kafka.consumer_config)
  messages = [(descriptor.key, descriptor.to_json())]
  registry.publish(bootstrap, kafka.model_topic, messages,
                   kafka.producer_config)
  if flags.publish_state == registry.LIVE:
    state = registry.read(bootstrap, kafka.model_topic, problem.name,
                          kafka.consumer_config)
    registry.publish(bootstrap, kafka.model_topic, registry.promote_messages(
        state, descriptor.name, descriptor.version), kafka.producer_config)
  print(f'[train] published {descriptor.ref} as {flags.publish_state} on '
        f'{kafka.model_topic}', file=sys.stderr, flush=True)
  return {'model': descriptor.ref, 'state': flags.publish_state,
          'topic': kafka.model_topic}


def run(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs all stages; returns (and writes) ``metrics.json``."""
  options = TrainOptions(runner_options.resolve(
      sys.argv[1:] if argv is None else argv))
  train_options = options.view_as(TrainOptions)
  problem = problem_lib.load(options.view_as(problem_lib.ProblemOptions).problem)
  topic = topic_range(options, problem)
  if topic is not None and train_options.input:
    raise SystemExit('pipelines.train: --input (files) or --input_topic, '
                     'not both')
  train_options.input = train_options.input or (
      None if topic else problem.data)
  if not (train_options.input or topic) or not train_options.output_dir:
    raise SystemExit('pipelines.train: --output_dir is required, and --input '
                     'or --input_topic unless the problem ships its data')
  source = topic or train_options.input
  output_dir = train_options.output_dir
  started = time.monotonic()

  print(f'[train] 1/3 {problem.name} ({problem.task.value}): preprocessing '
        f'{topic.describe() if topic else source} with tf.Transform',
        file=sys.stderr, flush=True)
  pipeline = beam.Pipeline(options=options)
  references = enrichment.sources(
      problem, options.view_as(enrichment.EnrichmentOptions).reference
  ) if problem.references else None
  build_preprocessing(pipeline, problem, source, output_dir,
                      train_options.eval_percent, train_options.batch_size,
                      references)
  result = pipeline.run()
  result.wait_until_finish()
  if options.view_as(TestOptions).dry_run:
    # Dataflow --dry_run: the job graph is built (runners.dataflow) and
    # nothing ran, so there is nothing to train on.
    print('[train] dry run: job graph built, stopping before training',
          file=sys.stderr, flush=True)
    return {'dry_run': True}
  preprocess_seconds = time.monotonic() - started
  if topic is None:
    n_valid = _counter(result, 'rows_valid')
    n_invalid = _counter(result, 'rows_invalid')
  else:
    n_valid = _counter(result, 'events_decoded', decode.METRICS_NAMESPACE)
    n_invalid = _counter(result, 'events_dead_lettered',
                         decode.METRICS_NAMESPACE)
  if problem.references:
    unjoined = _counter(result, 'events_dead_lettered',
                        enrichment.METRICS_NAMESPACE)
    n_valid, n_invalid = n_valid - unjoined, n_invalid + unjoined

  print('[train] 2/3 training the Keras model', file=sys.stderr, flush=True)
  import tensorflow as tf
  metrics, _ = train_and_export(problem, output_dir,
                                epochs=train_options.epochs)
  with tf.io.gfile.GFile(os.path.join(output_dir, 'stats.json')) as f:
    n_train = json.load(f)['count']
  metrics.update({
      'n_train': n_train,
      'n_eval': n_valid - n_train,
      'n_dead_letters': n_invalid,
  })
  metrics['seconds'] = dict(preprocess=preprocess_seconds,
                            **metrics['seconds'],
                            total=time.monotonic() - started)
  with tf.io.gfile.GFile(os.path.join(output_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  from models.metrics import HEADLINE
  headline, _ = HEADLINE[problem.task]
  print(f'[train] 3/3 exported model version {metrics["model_version"]}: '
        f'eval {headline} {metrics[headline]:.4f}, '
        f'{n_train} train / {metrics["n_eval"]} eval rows, '
        f'{n_invalid} dead letters', file=sys.stderr, flush=True)
  published = publish_model(problem, options, metrics['model_path'])
  if published:
    metrics['published'] = published
    with tf.io.gfile.GFile(os.path.join(output_dir, 'metrics.json'),
                           'w') as f:
      json.dump(metrics, f, indent=2)
  return metrics


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  run()
