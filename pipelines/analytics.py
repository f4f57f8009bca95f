"""Windowed analytics on event time, with late data as an output.

For any problem (``--problem``, default taxi), per key (default the problem's
entity key, e.g. the taxi pickup area) and event-time window: the count and
the problem's aggregates (e.g. taxi fare and tips sums and means and the tip
rate; house prices and price per square foot), with the pane (EARLY /
ON_TIME / LATE, index, is_last). Records too late for their window (watermark past window end
+ allowed lateness) go to the late output with a reason, and unparseable
events to the dead letters; nothing is dropped (see ``transforms.windowing``).
With ``--training_stats``, the same windows also report feature drift against
the training statistics and emit alerts (``transforms.monitoring``).

A problem's reference tables (``transforms.enrichment``; ``--reference
NAME=SOURCE``) are joined into each record before any window, as in
training and serving; an event the join refuses is a dead letter.

Streaming from Kafka (topics ``taxi-events`` -> ``taxi-stats``,
``taxi-late``, ``taxi-alerts``, ``taxi-dead-letters`` unless given)::

    python -m pipelines.analytics --bootstrap_servers 127.0.0.1:9092 \\
        --window fixed --size 3600 --allowed_lateness 7200 \\
        --early_every 10 --late_every 1 --accumulation accumulating \\
        --training_stats out/train/stats.json

Batch over CSV, event time from the problem's event-time field, JSON lines
out::

    python -m pipelines.analytics --input_csv data/taxi_trips.csv \\
        --output_path out/analytics --window sliding --size 3600 --period 900
    python -m tools.report --input out/analytics \\
        --output out/analytics/report.png

Other runners by flags only: ``--runner prism`` (or ``--runner PrismRunner
--prism_location /path/to/prism``), ``--runner flink --flink_master H:P``,
``--runner dataflow --project P --region R --temp_location gs://b/tmp``.

Outputs: Kafka topics (``--output_topic`` gets window stats, and drift and
quality rows, each with a ``type`` field; ``--late_topic``,
``--alerts_topic``, ``--dead_letter_topic``), or with ``--output_path`` the
files ``stats``, ``drift``, ``quality``, ``alerts``, ``late`` and
``dead_letters`` ``-SSSSS-of-NNNNN.jsonl`` (bounded input only: a CSV, or
Kafka with ``--bounded``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions

from runners import jobs
from runners import options as runner_options
from transforms import csv_io
from transforms import decode
from transforms import enrichment
from transforms import formats
from transforms import kafka_io
from transforms import monitoring
from transforms import problem as problem_lib
from transforms import stats as feature_stats
from transforms import windowing
from transforms.problem import Problem

# Row types on the shared output topic.
STATS, DRIFT, QUALITY = 'window_stats', 'drift', 'quality'
DEFAULT_GROUP_ID = 'rtml-analytics'
DEFAULT_MAX_OUT_OF_ORDERNESS = 60.0


class AnalyticsOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    # Kafka flags (--bootstrap_servers, --input_topic, --output_topic...) are
    # shared by every pipeline: kafka_io.KafkaOptions.
    parser.add_argument('--bounded', action='store_true',
                        help='Read Kafka up to the end offsets at launch.')
    parser.add_argument('--input_csv', default=None,
                        help='CSV file pattern: batch run instead of Kafka.')
    parser.add_argument('--output_path', default=None,
                        help='Directory for JSON lines outputs instead of '
                        'Kafka topics (bounded input only).')
    # The windowing flags (--window, --size...): windowing.WindowOptions;
    # drift (--training_stats, --drift_*): monitoring.MonitorOptions.


def _tagged(kind: str):
  return lambda row: {'type': kind, **row}


def _late_from(stage: str):
  return lambda row: {'stage': stage, **row}


def build(problem: Problem, records, config: windowing.WindowConfig,
          training_stats: Optional[dict[str, Any]] = None,
          thresholds: monitoring.DriftThresholds = monitoring.DriftThresholds()
          ) -> dict[str, Any]:
  """The analytics on timestamped ``Record``s; the seam for tests.

  Args:
    problem: what the records are and what to aggregate.
    records: ``PCollection[Record]`` timestamped with event time.
    config: the windowing.
    training_stats: a ``stats.json`` dict to add drift and alerts.
    thresholds: drift alert thresholds.

  Returns:
    ``{'stats', 'late'}`` and, with training stats, ``{'drift', 'quality',
    'alerts'}``: PCollections of JSON-ready dicts; every row carries a
    ``type`` (stats, drift, quality) or ``stage`` (late) field.
  """
  windowed = records | 'WindowedAggregates' >> windowing.WindowedAggregates(
      problem, config)
  out = {'stats': windowed['stats'] | 'TagStats' >> beam.Map(_tagged(STATS))}
  late = [windowed['late'] | 'TagLateStats' >> beam.Map(_late_from(STATS))]
  if training_stats is not None:
    monitored = (
        records
        | 'Unscored' >> beam.Map(monitoring.Scored.unscored)
        | 'MonitorDrift' >> monitoring.MonitorPredictions(
            problem, training_stats, config, thresholds))
    out['drift'] = monitored['drift'] | 'TagDrift' >> beam.Map(_tagged(DRIFT))
    out['quality'] = monitored['quality'] | 'TagQuality' >> beam.Map(
        _tagged(QUALITY))
    out['alerts'] = monitored['alerts']
    late.append(monitored['late'] | 'TagLateDrift' >> beam.Map(
        _late_from(DRIFT)))
  out['late'] = tuple(late) | 'MergeLate' >> beam.Flatten()
  return out


def read_csv_records(pipeline, problem: Problem, file_pattern: str):
  """CSV rows -> (timestamped Records, dead-letter dicts)."""
  parsed = (pipeline
            | 'ReadCsv' >> csv_io.ReadCsvRows(problem, file_pattern)
            | 'ParseRows' >> beam.ParDo(csv_io.ParseRow(problem)).with_outputs(
                csv_io.ParseRow.DEAD_LETTER, main='records'))
  keyed, dead_letters = parsed.records, [parsed[csv_io.ParseRow.DEAD_LETTER]]
  if problem.references:
    joined = keyed | 'Enrich' >> beam.ParDo(enrichment.Enrich(
        problem, enrichment.sources(problem, _reference_flags(pipeline)),
        _row_dead_letter, record_of=lambda kv: kv[1],
        with_record=lambda kv, record, versions: (kv[0], record))
    ).with_outputs(enrichment.Enrich.DEAD_LETTERS, main='records')
    keyed = joined.records
    dead_letters.append(joined[enrichment.Enrich.DEAD_LETTERS])
  records = (keyed
             | 'DropRowKeys' >> beam.Values()
             | 'AssignEventTime' >> windowing.AssignEventTime(problem))
  return records, _merged(dead_letters)


def read_kafka_records(pipeline, problem: Problem, opts: AnalyticsOptions):
  """Kafka events (``--input_format``) -> (Records timestamped by event
  time, dead letters)."""
  kafka = opts.view_as(kafka_io.KafkaOptions)
  event_format = formats.EventFormat.from_options(opts, problem)
  events = (
      pipeline
      | 'ReadEvents' >> kafka_io.ReadFromKafka(
          kafka_io.bootstrap_servers(opts),
          kafka.input_topic or problem.topic('events'),
          group_id=kafka.group_id or DEFAULT_GROUP_ID,
          auto_offset_reset=kafka.start,
          bounded=opts.bounded, event_time=decode.event_time(
              problem, event_format),
          watermark=kafka_io.policy_from_flags(
              kafka, DEFAULT_MAX_OUT_OF_ORDERNESS),
          partition_discovery_s=kafka.partition_discovery_s,
          readers=kafka_io.readers(opts),
          consumer_config=kafka.consumer_config)
      | 'DecodeEvents' >> decode.DecodeEvents(
          problem, event_format=event_format,
          with_source=bool(problem.references)))
  if not problem.references:
    return events.records, events.dead_letters
  # The same join as training and serving (transforms.enrichment); an event
  # it refuses is a dead letter with its original bytes.
  joined = events.records | 'Enrich' >> beam.ParDo(enrichment.Enrich(
      problem, enrichment.sources(
          problem, opts.view_as(enrichment.EnrichmentOptions).reference),
      lambda e, errors: kafka_io.dead_letter(e[0], errors, stage='Enrich'),
      record_of=lambda e: e[1],
      with_record=lambda e, record, versions: record,
      bootstrap=kafka_io.bootstrap_servers(opts),
      max_keys=opts.view_as(enrichment.EnrichmentOptions).reference_max_keys,
      consumer_config=kafka.consumer_config)).with_outputs(
          enrichment.Enrich.DEAD_LETTERS, main='records')
  return joined.records, _merged(
      [events.dead_letters, joined[enrichment.Enrich.DEAD_LETTERS]])


def _reference_flags(pipeline) -> list[str]:
  return pipeline.options.view_as(enrichment.EnrichmentOptions).reference


def _row_dead_letter(element, errors: list[dict]) -> dict[str, Any]:
  """A parsed CSV row the reference join refused (its record key and
  values; the row's text was parsed away)."""
  key, record = element
  return {'stage': 'Enrich', 'record_key': key,
          'values': dict(record.values), 'errors': errors}


def _merged(dead_letters: list):
  return (dead_letters[0] if len(dead_letters) == 1 else
          tuple(dead_letters) | 'MergeDeadLetters' >> beam.Flatten())


def _key_of(row: dict[str, Any]) -> str:
  if 'window_start_s' in row:
    return f"{row.get('feature', row.get('key'))}@{row['window_start_s']:g}"
  return str(row.get('key') or row.get('offset') or '')


def write_kafka(problem: Problem, outputs: dict[str, Any], dead_letters,
                opts: AnalyticsOptions) -> None:
  bootstrap = kafka_io.bootstrap_servers(opts)
  kafka = opts.view_as(kafka_io.KafkaOptions)
  topics = {'rows': kafka.output_topic or problem.topic('stats'),
            'late': kafka.late_topic or problem.topic('late'),
            'alerts': kafka.alerts_topic or problem.topic('alerts')}
  rows = tuple(outputs[k] for k in ('stats', 'drift', 'quality')
               if k in outputs) | 'MergeRows' >> beam.Flatten()
  streams = {'rows': rows, 'late': outputs['late']}
  if 'alerts' in outputs:
    streams['alerts'] = outputs['alerts']
  topics['dead_letters'] = (kafka.dead_letter_topic or
                            problem.topic('dead-letters'))
  for name, pcoll in streams.items():
    label = name.capitalize()
    unwritable = (pcoll
                  | f'Key{label}' >> beam.Map(lambda r: (_key_of(r), r))
                  | f'Write{label}' >> kafka_io.WriteToKafka(
                      bootstrap, topics[name],
                      producer_config=kafka.producer_config,
                      event_timestamps=False, give_up_s=kafka.give_up_s))
    _ = unwritable | f'LogUnwritable{label}' >> beam.FlatMap(
        kafka_io.log_unwritable, topics[name])
  unwritable = dead_letters | 'WriteDeadLetters' >> kafka_io.WriteDeadLetters(
      bootstrap, topics['dead_letters'], producer_config=kafka.producer_config,
      give_up_s=kafka.give_up_s)
  _ = unwritable | 'LogUnwritableDeadLetters' >> beam.FlatMap(
      kafka_io.log_unwritable, topics['dead_letters'])


def write_files(outputs: dict[str, Any], dead_letters, path: str) -> None:
  for name, pcoll in {**outputs, 'dead_letters': dead_letters}.items():
    label = ''.join(part.capitalize() for part in name.split('_'))
    _ = (pcoll
         | f'Dump{label}' >> beam.Map(json.dumps, sort_keys=True)
         | f'Write{label}' >> beam.io.WriteToText(
             os.path.join(path, name), file_name_suffix='.jsonl'))


def run(argv: Optional[list[str]] = None):
  """Builds and runs the analytics job; returns the PipelineResult."""
  argv = sys.argv[1:] if argv is None else argv
  given = PipelineOptions(argv).view_as(AnalyticsOptions)
  streaming = not given.input_csv and not given.bounded
  options = PipelineOptions(runner_options.resolve(argv, streaming=streaming))
  opts = options.view_as(AnalyticsOptions)
  problem = problem_lib.load(
      options.view_as(problem_lib.ProblemOptions).problem)
  config = windowing.window_config(options)
  stats_path = options.view_as(monitoring.MonitorOptions).training_stats
  training_stats = (feature_stats.read_stats(stats_path)
                    if stats_path else None)
  if streaming:
    options.view_as(StandardOptions).streaming = True
  if opts.output_path and not (opts.input_csv or opts.bounded):
    raise SystemExit('pipelines.analytics: --output_path needs a bounded '
                     'input (--input_csv, or --bounded Kafka)')
  pipeline = beam.Pipeline(options=options)
  if opts.input_csv:
    records, dead_letters = read_csv_records(pipeline, problem,
                                             opts.input_csv)
  else:
    records, dead_letters = read_kafka_records(pipeline, problem, opts)
  outputs = build(problem, records, config, training_stats,
                  monitoring.drift_thresholds(options))
  if opts.output_path:
    write_files(outputs, dead_letters, opts.output_path)
  else:
    write_kafka(problem, outputs, dead_letters, opts)
  result = pipeline.run()
  jobs.wait(result)  # not wait_until_finish: see runners.jobs
  return result


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  run()
