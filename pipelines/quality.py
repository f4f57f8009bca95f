"""Live model quality: the serving job's predictions joined to the labels
that come later, reported per model and window, with alerts.

Reads the predictions topic (``pipelines.serve``'s output) and a feedback
topic of ``{"event_id", "label", "label_time_ms"}`` records
(``transforms.feedback``), joins them by event id in event time with a TTL
(``--label_ttl``) and writes, per model (name and version) and fixed window
(``--size`` seconds, by the time each pair was complete):

* ``<problem>-quality``: one row per model, window and pane: the number of
  labelled events and the task's metrics (binary AUC, accuracy, log loss,
  calibration; multi-class accuracy and log loss; regression MAE and RMSE);
* ``<problem>-alerts``: a window whose metric crossed a threshold
  (``--min_auc``, ``--max_log_loss``, ...), with the evidence;
* ``<problem>-feedback-late``: predictions that got no label within the TTL
  (``unlabelled``), labels after the TTL or without a prediction
  (``late_label``), and pairs too late for their window (``late_pair``);
* ``<problem>-dead-letters``: records that are not JSON predictions or
  valid feedback, with their bytes and the reason.

Events that carry their own label (the replayed taxi trips do) can feed the
same path: ``--labels_in_predictions`` takes each prediction's ``label`` as
its feedback, known at the event time.

    python -m pipelines.quality --problem taxi \\
        --bootstrap_servers 127.0.0.1:9092 --label_ttl 3600 --size 600 \\
        --min_auc 0.85 [--runner prism|flink|dataflow ...]
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)

from runners import jobs
from runners import options as runner_options
from transforms import feedback as F
from transforms import flags
from transforms import kafka_io
from transforms import problem as problem_lib
from transforms import windowing
from transforms.kafka_io import KafkaRecord
from transforms.problem import Problem

DEFAULT_GROUP_ID = 'rtml-quality'
DEFAULT_MAX_OUT_OF_ORDERNESS = 60.0
PREDICTIONS, FEEDBACK, DEAD_LETTERS = 'predictions', 'feedback', 'dead_letters'


class QualityOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--predictions_topic', default=None,
                        help='Default <problem>-predictions.')
    parser.add_argument('--feedback_topic', default=None,
                        help='Default <problem>-feedback.')
    parser.add_argument('--quality_topic', default=None,
                        help='Default <problem>-quality.')
    parser.add_argument('--labels_in_predictions', action='store_true',
                        help='A prediction that carries its event\'s label '
                        'is its own feedback, known at the event time.')
    parser.add_argument('--label_ttl', type=float, default=3600.0,
                        help='Seconds after an event that its label may come.')
    # The windows: windowing.WindowOptions (--window, --size...).
    flags.add_flags(parser, F.QualityThresholds)


def thresholds(opts: QualityOptions) -> F.QualityThresholds:
  return flags.from_flags(F.QualityThresholds, opts)


def topics(problem: Problem, opts: QualityOptions) -> dict[str, str]:
  kafka = opts.view_as(kafka_io.KafkaOptions)
  return {
      PREDICTIONS: opts.predictions_topic or problem.topic('predictions'),
      FEEDBACK: opts.feedback_topic or problem.topic('feedback'),
      'quality': opts.quality_topic or problem.topic('quality'),
      'alerts': kafka.alerts_topic or problem.topic('alerts'),
      'late': kafka.late_topic or problem.topic('feedback-late'),
      DEAD_LETTERS: kafka.dead_letter_topic or problem.topic('dead-letters')}


class InputEventTime:
  """The source's event time: a prediction's event time, a label's time."""

  def __init__(self, predictions_topic: str):
    self._predictions_topic = predictions_topic

  def __call__(self, record: KafkaRecord) -> Optional[float]:
    field = ('event_time_ms' if record.topic == self._predictions_topic
             else 'label_time_ms')
    try:
      ms = json.loads(record.value)[field]
      return float(ms) / 1000 if not isinstance(ms, bool) else None
    except Exception:  # pylint: disable=broad-except
      return None  # the Kafka timestamp; decoding dead-letters it


class DecodeInputsFn(beam.DoFn):
  """KafkaRecord -> (event id, prediction) on ``predictions``, (event id,
  feedback) on ``feedback``, or a dead letter."""

  def __init__(self, problem: Problem, predictions_topic: str,
               labels_in_predictions: bool):
    self._problem = problem
    self._predictions_topic = predictions_topic
    self._labels_in_predictions = labels_in_predictions
    self._dead = Metrics.counter('feedback', 'dead_lettered')

  def process(self, record: KafkaRecord):
    try:
      value = json.loads(record.value)
      if record.topic == self._predictions_topic:
        yield from self._prediction(value)
      else:
        feedback = F.feedback_record(self._problem, value)
        yield beam.pvalue.TaggedOutput(FEEDBACK,
                                       (feedback['event_id'], feedback))
    except Exception as e:  # pylint: disable=broad-except
      self._dead.inc()
      yield beam.pvalue.TaggedOutput(DEAD_LETTERS, kafka_io.dead_letter(
          record, [{'field': '*', 'value': None,
                    'reason': f'{type(e).__name__}: {e}'}],
          stage='DecodeFeedback'))

  def _prediction(self, value: Any):
    if not isinstance(value, dict) or not isinstance(
        value.get('event_id'), str):
      raise F.InvalidFeedback('not a prediction record (no event_id)')
    event_ms = value.get('event_time_ms')
    if isinstance(event_ms, bool) or not isinstance(event_ms, (int, float)):
      raise F.InvalidFeedback('not a prediction record (no event_time_ms)')
    yield value['event_id'], value
    if self._labels_in_predictions and value.get('label') is not None:
      yield beam.pvalue.TaggedOutput(FEEDBACK, (value['event_id'], {
          'event_id': value['event_id'],
          'label': F.label_of(self._problem, value['label']),
          'label_time_ms': int(event_ms)}))


def build(problem: Problem, predictions, feedback, opts: QualityOptions
          ) -> dict[str, Any]:
  """Joined quality rows, alerts and late records from keyed predictions
  and feedback."""
  joined = {PREDICTIONS: predictions, FEEDBACK: feedback} | (
      'JoinFeedback' >> F.JoinFeedback(opts.label_ttl))
  config = windowing.window_config(opts)
  quality = joined['joined'] | 'LiveQuality' >> F.LiveQuality(problem, config)
  alerts = quality['quality'] | 'Alerts' >> beam.FlatMap(
      F.quality_alerts, thresholds(opts))
  late = (
      joined['unlabelled'] | 'TagUnlabelled' >> beam.Map(
          lambda r: dict(r, type='unlabelled')),
      joined['late'] | 'TagLateLabels' >> beam.Map(
          lambda r: dict(r, type='late_label')),
      quality['late'] | 'TagLatePairs' >> beam.Map(
          lambda r: dict(r, type='late_pair'))) | 'MergeLate' >> beam.Flatten()
  return {'quality': quality['quality'], 'alerts': alerts, 'late': late}


def _key_of(row: dict[str, Any]) -> str:
  if 'window_start_s' in row:
    return f"{row.get('model_key')}@{row['window_start_s']:g}"
  return str(row.get('event_id') or row.get('key') or '')


def start(argv: Optional[list[str]] = None):
  """Builds and starts the quality job; returns without waiting."""
  argv = sys.argv[1:] if argv is None else argv
  options = PipelineOptions(runner_options.resolve(argv, streaming=True))
  options.view_as(StandardOptions).streaming = True
  opts = options.view_as(QualityOptions)
  kafka = options.view_as(kafka_io.KafkaOptions)
  problem = problem_lib.load(
      options.view_as(problem_lib.ProblemOptions).problem)
  names = topics(problem, opts)
  bootstrap = kafka_io.bootstrap_servers(options)
  pipeline = beam.Pipeline(options=options)
  decoded = (
      pipeline
      | 'ReadPredictionsAndFeedback' >> kafka_io.ReadFromKafka(
          bootstrap, [names[PREDICTIONS], names[FEEDBACK]],
          group_id=kafka.group_id or DEFAULT_GROUP_ID,
          auto_offset_reset=kafka.start,
          event_time=InputEventTime(names[PREDICTIONS]),
          watermark=kafka_io.policy_from_flags(
              kafka, DEFAULT_MAX_OUT_OF_ORDERNESS),
          partition_discovery_s=kafka.partition_discovery_s,
          readers=kafka_io.readers(options),
          consumer_config=kafka.consumer_config)
      | 'Decode' >> beam.ParDo(DecodeInputsFn(
          problem, names[PREDICTIONS], opts.labels_in_predictions)
      ).with_outputs(FEEDBACK, DEAD_LETTERS, main=PREDICTIONS))
  outputs = build(problem, decoded[PREDICTIONS], decoded[FEEDBACK], opts)
  outputs[DEAD_LETTERS] = decoded[DEAD_LETTERS]
  for name, pcoll in outputs.items():
    label = ''.join(part.capitalize() for part in name.split('_'))
    topic = names[name]
    unwritable = (pcoll
                  | f'Key{label}' >> beam.Map(lambda r: (_key_of(r), r))
                  | f'Write{label}' >> kafka_io.WriteToKafka(
                      bootstrap, topic, producer_config=kafka.producer_config,
                      event_timestamps=False, give_up_s=kafka.give_up_s))
    _ = unwritable | f'LogUnwritable{label}' >> beam.FlatMap(
        kafka_io.log_unwritable, topic)
  print(f'[quality] {problem.name}: {bootstrap} {names[PREDICTIONS]} + '
        f'{names[FEEDBACK]} -> {names["quality"]} (alerts: '
        f'{names["alerts"]}, late: {names["late"]})', file=sys.stderr,
        flush=True)
  return pipeline.run()


def run(argv: Optional[list[str]] = None):
  """Runs the quality job until it is cancelled."""
  result = start(argv)
  jobs.wait(result)  # not wait_until_finish: see runners.jobs
  return result


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  run()
