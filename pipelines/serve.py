"""Streaming inference: Kafka events → RunInference → Kafka predictions.

Raw JSON events of a problem (``--problem``, default taxi) are read with the
project's Kafka source (event time from the problem's event-time field, else
the Kafka timestamp), parsed and validated by the same ``transforms.records``
code as training, and scored by Beam RunInference with
the exported SavedModel, whose signature takes raw features and runs the
tf.Transform graph inside. One prediction per event goes to the output topic,
stamped with the model version. The source hands over one poll of a
partition at a time (at most ``--max_batch_size`` events), and that poll is
parsed and scored as one batch at once: no event waits for a batch to fill.
Every event the job cannot use, at any stage
(decoding, validation, inference, formatting, writing), goes to the
dead-letter topic with its original bytes and a reason; nothing is dropped
and no event stops the job.

Delivery (``--delivery``): at-least-once by default (a restart may repeat the
last bundle's predictions); ``exactly_once`` commits each bundle's outputs and
its input offsets in one Kafka transaction (``kafka_io.WriteTransactionally``;
read the outputs with ``isolation_level=read_committed``).

Monitoring (``--training_stats out/train/stats.json``): per event-time
window (``--monitor_window`` seconds) and model version, feature drift
against the training statistics, the prediction distribution (and quality
on events that carry their label) and dead letters per stage go to
``--metrics_topic`` (default ``<problem>-metrics``), crossed thresholds
(``--drift_*``) to ``--alerts_topic``, events too late for their window to
``--late_topic`` (``transforms.monitoring``). Labels that come later are
joined by ``pipelines.quality``.

New model versions are picked up without a restart: the pipeline watches
``--model_dir`` for ``<integer>/`` version directories, validates each new one
and swaps it in between batches (see ``models.serving``). Or models are
data: with ``--model_topic`` the job follows the model registry topic
(``models.registry``; ``python -m tools.models`` publishes, promotes, rolls
back) and serves the ``--plan`` (or the plan on the topic): ``single``,
``ab``, ``shadow``, ``ensemble``, ``budget`` or ``confidence``. Shadows'
answers go to ``--shadow_topic`` (default ``<problem>-shadow``), their
agreement with the live answers per ``--monitor_window`` to the metrics
topic, model loads and rejections to ``--model_events_topic``.

Run it locally (DirectRunner), or unchanged on another runner by flags::

    python -m pipelines.serve --bootstrap_servers 127.0.0.1:9092 \\
        --model_dir out/model    # topics taxi-events -> taxi-predictions
    python -m pipelines.serve --problem houses --model_dir out/houses/model
    python -m pipelines.serve ... --runner prism
    python -m pipelines.serve ... --runner flink --flink_master HOST:8081

Each prediction record (JSON, Kafka key = event id)::

    {"event_id": "taxi_trips-17", "problem": "taxi",
     "event_time": "2013-05-16T19:45:00Z", "event_time_ms": 1368733500000,
     "probability": 0.91, "class": 1,          # per task, see below
     "model": "taxi", "model_version": 3, "strategy": "single",
     "decision": {"arm": "taxi@3"},           # multi-model plans only
     "label": 1,                              # when the event has it
     "source": {"topic": "taxi-events", "partition": 0, "offset": 16,
                "timestamp_ms": 1368733500000},
     "ingest_ms": 1795290000123, "predicted_ms": 1795290000131}

The outputs follow the task: binary ``probability`` and ``class``;
multi-class ``probabilities``, ``class`` (index) and ``class_name``;
regression ``prediction``. ``label`` is the true class index or value.

``ingest_ms`` is when the source handed the event to the pipeline and
``predicted_ms`` when its prediction was ready (wall clock); the Kafka
timestamp of the prediction record is when it was produced.
"""

from __future__ import annotations

import datetime
import functools
import logging
import sys
import time
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.options.pipeline_options import TestOptions
from apache_beam.runners.runner import PipelineState

from models import registry
from models import serving
from models import strategies
from runners import jobs
from runners import options as runner_options
from transforms import decode
from transforms import enrichment
from transforms import formats
from transforms import kafka_io
from transforms import monitoring
from transforms import problem as problem_lib
from transforms import records as R
from transforms import stats as feature_stats
from transforms import windowing
from transforms.problem import Problem, Task
from transforms.records import Record

METRICS_NAMESPACE = serving.METRICS_NAMESPACE
DEFAULT_GROUP_ID = 'rtml-serve'
# Events are scored one by one: the watermark only matters for monitoring.
DEFAULT_MAX_OUT_OF_ORDERNESS = 3600.0


AUTO = 'auto'  # a flag's default that depends on the runner


class ServeOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    # Kafka flags (--bootstrap_servers, --input_topic, --output_topic...) are
    # shared by every pipeline: kafka_io.KafkaOptions.
    parser.add_argument('--model_dir',
                        help='Directory of <integer>/ SavedModel versions '
                        '(or --model_topic: models from the registry).')
    parser.add_argument('--plan', default=None,
                        help='Serving plan, JSON or a .json/.yaml file: '
                        '{"strategy": "single|ab|shadow|ensemble|budget|'
                        'confidence", "models": [...], ...} '
                        '(models.registry.ServingPlan). A plan on the '
                        'registry topic overrides it. Default: the live '
                        'version of --model_name.')
    parser.add_argument('--model_poll_secs', type=float, default=5.0,
                        help='How often to look for a new model version.')
    parser.add_argument('--max_batch_size', type=int, default=256,
                        help='Most events one model call scores: the source '
                        'hands over what one poll of a partition returned, '
                        'up to this many, and RunInference scores it at '
                        'once (no waiting for a batch to fill).')
    parser.add_argument('--bundle_secs', type=float, default=1.0,
                        help='How long the Kafka source reads before it '
                        'checkpoints. Shorter bundles commit output sooner '
                        'but each costs a scheduling round trip '
                        '(benchmarks/serve_bench.py).')
    # Default ('auto'): on with at-least-once, except on Flink, whose job
    # server runs a checkpointed read's residual only after its own bundle
    # (--max_bundle_time_mills, set short for streaming by runners.options)
    # and held predictions back with it on; off with exactly-once, where
    # each bundle pays a transaction.
    parser.add_argument('--end_bundle_when_caught_up', action='store_true',
                        default=AUTO,
                        help='End a partition\'s read as soon as it has '
                        'caught up with the log, so the bundle ends and the '
                        'next one (another partition, or this one again) '
                        'starts at once, instead of reading on for '
                        '--bundle_secs while the other partitions of the '
                        'bundle wait. Default: on with at-least-once except '
                        'on Flink (README, "Benchmarks").')
    parser.add_argument('--no_end_bundle_when_caught_up', action='store_false',
                        dest='end_bundle_when_caught_up',
                        help='Long bundles (--bundle_secs) always.')
    parser.add_argument('--run_seconds', type=float, default=None,
                        help='Stop after this long (demos); default: forever.')
    # Monitoring: --training_stats and --drift_* (monitoring.MonitorOptions)
    # turn it on; rows to --metrics_topic, alerts to --alerts_topic.
    parser.add_argument('--monitor_window', type=float, default=3600.0,
                        help='Event-time window of the monitor, seconds.')
    parser.add_argument('--monitor_allowed_lateness', type=float,
                        default=3600.0,
                        help='Seconds after a monitor window closes that its '
                        'late events still count (LATE panes); later ones go '
                        'to the late topic.')


class EventContext(NamedTuple):
  """What a prediction needs to know about its event besides the features.

  ``key`` and ``value`` are the original bytes, for a dead letter should a
  later stage fail on the event; ``references`` the version of each
  reference table joined into it.
  """
  event_id: str
  topic: str
  partition: int
  offset: int
  timestamp_ms: int
  ingest_ms: int
  key: Optional[bytes] = None
  value: Optional[bytes] = None
  references: Optional[dict] = None

  def dead_letter(self, reason: str, stage: str) -> tuple[str, dict]:
    """(event id, dead letter) of this event."""
    return self.event_id, kafka_io.dead_letter(
        kafka_io.KafkaRecord(self.topic, self.partition, self.offset,
                             self.key, self.value, self.timestamp_ms),
        [{'field': '*', 'value': None, 'reason': reason}], stage=stage)


def attach_context(element: tuple[kafka_io.KafkaRecord, Record]
                   ) -> tuple[EventContext, Record]:
  """The event's id: the problem's id field, else the Kafka key, else
  topic-partition-offset."""
  source, record = element
  if record.event_id is not None:
    event_id = record.event_id
  elif source.key is not None:
    event_id = source.key.decode('utf-8', errors='replace')
  else:
    event_id = f'{source.topic}-{source.partition}-{source.offset}'
  return EventContext(event_id, source.topic, source.partition, source.offset,
                      source.timestamp_ms, int(time.time() * 1000),
                      source.key, source.value), record


def prediction_record(problem: Problem, context: EventContext,
                      result: PredictionResult) -> dict[str, Any]:
  """The JSON prediction written to the output topic (see module doc)."""
  served = result.inference
  extra = {'strategy': served.strategy}
  if served.decision:
    extra['decision'] = served.decision
  return answer_record(problem, context, result.example, served.answer,
                       served.model, served.version, **extra)


def answer_record(problem: Problem, context: EventContext, record: Record,
                  answer: dict[str, Any], model: str, version: int,
                  **extra) -> dict[str, Any]:
  """One model's answer to one event as a JSON record: the prediction, or
  a shadow's answer."""
  event_ms = event_time_ms(problem, context, record)
  outputs = dict(answer)
  if problem.task is Task.MULTICLASS:
    outputs['class_name'] = problem.label.classes[outputs['class']]
  return {
      'event_id': context.event_id,
      'problem': problem.name,
      'event_time': _iso(event_ms),
      'event_time_ms': event_ms,
      **outputs,
      'model': model,
      'model_version': int(version),
      **extra,
      'label': R.label_value(problem, record),
      **({'references': context.references} if context.references else {}),
      'source': {'topic': context.topic, 'partition': context.partition,
                 'offset': context.offset,
                 'timestamp_ms': context.timestamp_ms},
      'ingest_ms': context.ingest_ms,
      'predicted_ms': int(time.time() * 1000),
  }


def event_time_ms(problem: Problem, context: EventContext,
                  record: Record) -> int:
  """The event's time: its event-time field, else its Kafka timestamp."""
  seconds = R.event_seconds(problem, record)
  return (int(round(seconds * 1000)) if seconds is not None
          else context.timestamp_ms)


def at_event_time(problem: Problem, context: EventContext, record: Record,
                  value: Any) -> Any:
  """``value`` stamped with its event's time again (as it comes, when that
  time cannot be read).

  The source emits a poll's events as one batch, and a batch, so each of
  its results, carries one timestamp: the earliest event time of the poll.
  What is windowed after inference (the monitor, the dead-letter counts)
  takes its event's own time back.
  """
  try:
    return beam.window.TimestampedValue(
        value, event_time_ms(problem, context, record) / 1000)
  except Exception:  # pylint: disable=broad-except
    return value


def _iso(ms: int) -> Optional[str]:
  """UTC ISO-8601 of epoch milliseconds; None outside datetime's range."""
  try:
    return datetime.datetime.fromtimestamp(
        ms / 1000, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
  except (OverflowError, OSError, ValueError):
    return None


class FormatPrediction(beam.DoFn):
  """(EventContext, PredictionResult) -> (event id, prediction dict), or a
  dead letter (``DEAD_LETTERS`` output) for an event the model could not
  score or whose prediction cannot be formatted.

  With ``shadows``, each shadow's answer goes to ``SHADOW`` as (event id,
  record) and its agreement with the live answer to ``AGREEMENT``; a
  shadow that failed is counted, never a dead letter (the event was
  answered).
  """

  DEAD_LETTERS = 'dead_letters'
  SCORED = 'scored'
  SHADOW = 'shadow'
  AGREEMENT = 'agreement'

  def __init__(self, problem: Problem, monitor: bool = False,
               shadows: bool = False):
    self._problem = problem
    self._monitor = monitor
    self._shadows = shadows
    self._predictions = Metrics.counter(METRICS_NAMESPACE, 'predictions')
    self._failed = Metrics.counter(METRICS_NAMESPACE, 'inference_failures')
    self._shadow_failed = Metrics.counter(METRICS_NAMESPACE,
                                          'shadow_failures')
    self._latency = Metrics.distribution(METRICS_NAMESPACE,
                                         'ingest_to_prediction_ms')

  def process(self, element):
    context, result = element
    served = result.inference
    if isinstance(served.answer, serving.FailedInference):
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, at_event_time(
          self._problem, context, result.example,
          context.dead_letter(served.answer.reason, 'Predict')))
      return
    try:
      prediction = prediction_record(self._problem, context, result)
    except Exception as e:  # pylint: disable=broad-except
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(self.DEAD_LETTERS, at_event_time(
          self._problem, context, result.example, context.dead_letter(
              f'formatting the prediction failed: {type(e).__name__}: {e}',
              'FormatPrediction')))
      return
    self._predictions.inc()
    self._latency.update(prediction['predicted_ms'] - context.ingest_ms)
    yield context.event_id, prediction
    live = f'{served.model}@{served.version}'
    if self._monitor:
      yield beam.pvalue.TaggedOutput(self.SCORED, beam.window.TimestampedValue(
          monitoring.Scored.of(
              self._problem, result.example, served.answer, model=live,
              event_id=context.event_id),
          prediction['event_time_ms'] / 1000))
    if self._shadows:
      yield from self._shadow_outputs(context, result.example, served,
                                      prediction['event_time_ms'])

  def _shadow_outputs(self, context, record, served, event_ms):
    live = f'{served.model}@{served.version}'
    for name, version, answer, ms in served.shadows:
      if isinstance(answer, serving.FailedInference):
        self._shadow_failed.inc()
        continue
      try:
        shadow = answer_record(self._problem, context, record, answer, name,
                               version, strategy='shadow', shadow_of=live,
                               latency_ms=ms)
        same, diff = strategies.disagreement(self._problem.task,
                                             served.answer, answer)
      except Exception:  # pylint: disable=broad-except
        self._shadow_failed.inc()
        continue
      yield beam.pvalue.TaggedOutput(self.SHADOW, (context.event_id, shadow))
      yield beam.pvalue.TaggedOutput(
          self.AGREEMENT, beam.window.TimestampedValue(
              {'live': live, 'shadow': f'{name}@{version}',
               'same_class': same, 'abs_diff': diff}, event_ms / 1000))


class InferenceDeadLetters(beam.DoFn):
  """(failed batch, exception) -> one dead letter per event of the batch.

  The handler isolates failing events itself (``models.serving``); this is
  for what RunInference catches around it (e.g. the model failing to load).
  """

  def __init__(self, problem: Problem):
    self._problem = problem
    self._failed = Metrics.counter(METRICS_NAMESPACE, 'inference_failures')

  def process(self, element):
    batch, exception = element
    for context, record in batch:
      self._failed.inc()
      letter = context.dead_letter(
          f'inference failed: {type(exception).__name__}: {exception}',
          'Predict')
      yield at_event_time(self._problem, context, record, letter)


class Predict(beam.PTransform):
  """Lists of (EventContext, Record), each scored as one batch → (event id,
  prediction dict) per event, and failures.

  Args:
    problem: the events' problem (what the model takes and answers).
    model_root: directory of versions; the newest valid one serves and newer
      ones are swapped in as they appear (``models.serving``).
    model_poll_secs: how often to look for a new version.
    registry_spec: models and plan from the registry topic instead.
    model_name: the name predictions carry in directory mode.
    shadows: emit shadow answers and agreement (``FormatPrediction``).
  """

  def __init__(self, problem: Problem, model_root: Optional[str],
               model_poll_secs: float = 5.0,
               check_model: bool = True, monitor: bool = False,
               registry_spec: Optional[serving.RegistrySpec] = None,
               model_name: Optional[str] = None, shadows: bool = False):
    super().__init__()
    self._monitor = monitor
    self._shadows = shadows
    if check_model:
      # Fail at launch, not on a worker, when nothing can be served.
      if registry_spec is not None:
        check_registry(problem, registry_spec)
      else:
        serving.newest_valid_version(problem, model_root)
    self._problem = problem
    # Elements come batched (one poll each): RunInference skips its own
    # BatchElements, which would hold a half-full batch until the bundle
    # ends.
    self._handler = KeyedModelHandler(serving.RawFeaturesModelHandler(
        problem, model_root, model_poll_secs, registry_spec=registry_spec,
        model_name=model_name)).with_no_batching()

  def expand(self, events):
    results, failures = (
        events
        | 'RunInference' >> RunInference(
            self._handler, metrics_namespace=METRICS_NAMESPACE
        ).with_exception_handling())
    # Outputs only when consumed: an output without a consumer is not free
    # on every runner.
    tags = ((FormatPrediction.DEAD_LETTERS,)
            + ((FormatPrediction.SCORED,) if self._monitor else ())
            + ((FormatPrediction.SHADOW, FormatPrediction.AGREEMENT)
               if self._shadows else ()))
    formatted = results | 'FormatPrediction' >> beam.ParDo(
        FormatPrediction(self._problem, self._monitor, self._shadows)
    ).with_outputs(*tags, main='predictions')
    failed = failures.failed_inferences | 'FailedToDeadLetters' >> (
        beam.ParDo(InferenceDeadLetters(self._problem)))
    # Two failure streams, not flattened: a Flatten may end the fused stage
    # (it does on Prism), and a dead letter must be written in the bundle
    # that read its event, before that bundle's offsets are committed.
    return {
        'predictions': formatted.predictions,
        'failures': (formatted[FormatPrediction.DEAD_LETTERS], failed),
        # monitoring.Scored of every prediction, when monitoring.
        'scored': formatted[FormatPrediction.SCORED] if self._monitor
                  else None,
        'shadow': formatted[FormatPrediction.SHADOW] if self._shadows
                  else None,
        'agreement': formatted[FormatPrediction.AGREEMENT] if self._shadows
                     else None,
    }


def check_registry(problem: Problem, spec: serving.RegistrySpec,
                   wait_s: float = 600.0) -> None:
  """Waits (with a line every 10 s) until the registry names a model the
  plan serves: a job may be deployed before its first model is trained.
  Exits with a reason after ``wait_s``, or at once on a bad plan."""
  deadline = time.monotonic() + wait_s
  last_line = 0.0
  registry.ensure_topic(spec.bootstrap_servers, spec.topic,
                        spec.consumer_config)
  while True:
    try:
      state = registry.read(spec.bootstrap_servers, spec.topic, problem.name,
                            spec.consumer_config)
      plan = state.plan or spec.plan
      plan.check(problem.task.value)
    except (registry.InvalidMessage, TimeoutError) as e:
      raise SystemExit(f'pipelines.serve: {e}') from e
    if any(state.resolve(ref) for ref in plan.models):
      return
    known = ', '.join(f'{d.ref} ({d.state})' for d in state.descriptors())
    if time.monotonic() > deadline:
      raise SystemExit(
          f'pipelines.serve: no model of the plan {list(plan.models)} is in '
          f'the registry {spec.topic!r} (it has: {known or "nothing"}); '
          'publish one first: python -m tools.models publish')
    if time.monotonic() - last_line > 10:
      last_line = time.monotonic()
      print(f'[serve] waiting for a model of the plan {list(plan.models)} '
            f'on {spec.topic!r} (it has: {known or "nothing"})',
            file=sys.stderr, flush=True)
    time.sleep(2)


def model_name(problem: Problem, opts: PipelineOptions) -> str:
  return opts.view_as(registry.RegistryOptions).model_name or problem.name


def registry_spec(problem: Problem, opts: 'ServeOptions'
                  ) -> Optional[serving.RegistrySpec]:
  """The registry the job follows (``--model_topic``), or None."""
  kafka = opts.view_as(kafka_io.KafkaOptions)
  if not kafka.model_topic:
    return None
  plan = (registry.load_plan(opts.plan) if opts.plan
          else registry.single_plan(model_name(problem, opts)))
  return serving.RegistrySpec(
      kafka_io.bootstrap_servers(opts), kafka.model_topic, plan,
      kafka.model_events_topic or problem.topic('model-events'),
      dict(kafka.consumer_config), dict(kafka.producer_config))


def end_bundle_when_caught_up(opts: ServeOptions, exactly_once: bool) -> bool:
  """``--end_bundle_when_caught_up``, or its default for the runner and
  delivery mode (see the flag)."""
  if opts.end_bundle_when_caught_up != AUTO:
    return bool(opts.end_bundle_when_caught_up)
  runner = (opts.view_as(StandardOptions).runner or '').lower()
  return not exactly_once and 'flink' not in runner


def topics(problem: Problem, kafka: kafka_io.KafkaOptions) -> dict[str, str]:
  """The job's topics: the flags, else the problem's."""
  return {'input': kafka.input_topic or problem.topic('events'),
          'output': kafka.output_topic or problem.topic('predictions'),
          'dead_letters': (kafka.dead_letter_topic
                           or problem.topic('dead-letters')),
          'metrics': kafka.metrics_topic or problem.topic('metrics'),
          'alerts': kafka.alerts_topic or problem.topic('alerts'),
          'late': kafka.late_topic or problem.topic('monitor-late'),
          'shadow': kafka.shadow_topic or problem.topic('shadow'),
          'model_events': (kafka.model_events_topic
                           or problem.topic('model-events'))}


def build(pipeline: beam.Pipeline, opts: ServeOptions,
          problem: Problem) -> dict[str, Any]:
  """Adds the serving job to ``pipeline``; returns its PCollections."""
  bootstrap = kafka_io.bootstrap_servers(opts)
  kafka = opts.view_as(kafka_io.KafkaOptions)
  names = topics(problem, kafka)
  group_id = kafka.group_id or DEFAULT_GROUP_ID
  event_format = formats.EventFormat.from_options(opts, problem)
  exactly_once = kafka.delivery == kafka_io.EXACTLY_ONCE
  # The source emits what one poll of a partition returned (at most
  # --max_batch_size events) as one element; every step up to RunInference
  # handles the whole poll, and RunInference scores it as one batch: an
  # event waits for nothing but its poll, as in a hand-written consumer
  # loop, and Beam's per-element cost is paid once per poll.
  events = (
      pipeline
      | 'ReadEvents' >> kafka_io.ReadFromKafka(
          bootstrap, names['input'], group_id=group_id,
          # Exactly-once: the output transactions commit the offsets.
          commit_offsets=not exactly_once, give_up_s=kafka.give_up_s,
          auto_offset_reset=kafka.start, event_time=decode.event_time(
              problem, event_format),
          watermark=kafka_io.policy_from_flags(
              kafka, DEFAULT_MAX_OUT_OF_ORDERNESS),
          checkpoint_interval_s=opts.bundle_secs,
          end_bundle_when_caught_up=end_bundle_when_caught_up(
              opts, exactly_once),
          batches=True, max_poll_records=opts.max_batch_size,
          poll_timeout_s=min(1.0, opts.bundle_secs),
          partition_discovery_s=kafka.partition_discovery_s,
          readers=kafka_io.readers(opts),
          consumer_config=kafka.consumer_config)
      | 'ParseEvents' >> decode.DecodeEvents(
          problem, with_source=True, event_format=event_format,
          batches=True))
  stats_path = opts.view_as(monitoring.MonitorOptions).training_stats
  spec = registry_spec(problem, opts)
  contexts = events.records | 'AttachContext' >> beam.Map(
      lambda batch: [attach_context(e) for e in batch])
  unjoined = None
  if problem.references:
    flags = opts.view_as(enrichment.EnrichmentOptions)
    joined = contexts | 'Enrich' >> beam.ParDo(enrichment.Enrich(
        problem, enrichment.sources(problem, flags.reference),
        functools.partial(_enrichment_dead_letter, problem),
        record_of=lambda e: e[1],
        with_record=lambda e, record, versions: (
            e[0]._replace(references=versions), record),
        bootstrap=bootstrap, max_keys=flags.reference_max_keys,
        consumer_config=kafka.consumer_config, batches=True)).with_outputs(
            enrichment.Enrich.DEAD_LETTERS, main='records')
    contexts = joined.records
    unjoined = joined[enrichment.Enrich.DEAD_LETTERS]
  scored = (contexts
            | 'Predict' >> Predict(
                problem, opts.model_dir, opts.model_poll_secs,
                # A Dataflow --dry_run builds the graph without touching the
                # (remote) model directory.
                check_model=not opts.view_as(TestOptions).dry_run,
                monitor=bool(stats_path), registry_spec=spec,
                model_name=model_name(problem, opts),
                # A registry plan may add shadows at any time.
                shadows=spec is not None))
  decode_failures = events.dead_letters | 'KeyDeadLetters' >> beam.Map(
      lambda d: (f"{d['topic']}-{d['partition']}-{d['offset']}", d))
  failures = {'Decode': decode_failures, 'Predict': scored['failures'][0],
              'Batch': scored['failures'][1]}
  if unjoined is not None:
    failures['Enrich'] = unjoined
  if exactly_once:
    # Every stream has its own writer, fused with the read (no Flatten: it
    # ends the fused stage on Prism); the writers of a bundle share one
    # transaction, which also commits the bundle's input offsets.
    outputs = {'Prediction': scored['predictions'] | 'PredictionOutputs' >> (
        beam.Map(_prediction_output, names['output']))}
    for label, stream in failures.items():
      outputs[f'{label}DeadLetter'] = stream | f'{label}DeadLetterOutputs' >> (
          beam.Map(_dead_letter_output, names['dead_letters']))
    for label, stream in outputs.items():
      _ = stream | f'Write{label}s' >> kafka_io.WriteTransactionally(
          bootstrap, group_id, names['dead_letters'],
          producer_config=kafka.producer_config, give_up_s=kafka.give_up_s)
    dead_letters = tuple(failures.values()) | 'MergeDeadLetters' >> (
        beam.Flatten())
    return _with_shadows(opts, names, scored, _with_monitor(
        problem, opts, names, scored, dead_letters))
  unwritable = scored['predictions'] | 'WritePredictions' >> (
      kafka_io.WriteToKafka(bootstrap, names['output'],
                            producer_config=kafka.producer_config,
                            event_timestamps=False, give_up_s=kafka.give_up_s))
  streams = dict(failures, Unwritable=unwritable | (
      'UnwritableToDeadLetters' >> beam.Map(_unwritable_dead_letter,
                                             names['output'])))
  # One writer per stream, each fused with the read: the reader commits a
  # bundle's offsets once the bundle is done, so its dead letters must be
  # flushed by then. (A Flatten before one writer split the stage on Prism,
  # and a SIGKILL lost dead letters whose offsets were committed.)
  for label, stream in streams.items():
    lost = stream | f'Write{label}DeadLetters' >> kafka_io.WriteToKafka(
        bootstrap, names['dead_letters'],
        producer_config=kafka.producer_config, event_timestamps=False,
        give_up_s=kafka.give_up_s)
    _ = lost | f'LogUnwritable{label}DeadLetters' >> beam.FlatMap(
        kafka_io.log_unwritable, names['dead_letters'])
  dead_letters = tuple(streams.values()) | 'MergeDeadLetters' >> (
      beam.Flatten())
  return _with_shadows(opts, names, scored, _with_monitor(
      problem, opts, names, scored, dead_letters))


def _with_monitor(problem: Problem, opts: ServeOptions, names: dict[str, str],
                  scored: dict[str, Any], dead_letters) -> dict[str, Any]:
  """The job's outputs, and with ``--training_stats`` the monitor's: drift,
  prediction distribution and dead letters per window and model to the
  metrics topic, alerts and late events to theirs.

  The monitor's rows are written at least once whatever ``--delivery`` says:
  each is keyed by what it measures and its window, so a repeated row
  repeats the same figures (a compacted topic keeps one).
  """
  outputs = {'predictions': scored['predictions'],
             'dead_letters': dead_letters}
  stats_path = opts.view_as(monitoring.MonitorOptions).training_stats
  if not stats_path:
    return outputs
  config = windowing.WindowConfig(
      kind=windowing.WindowKind.FIXED, size=opts.monitor_window,
      allowed_lateness=opts.monitor_allowed_lateness)
  monitored = scored['scored'] | 'Monitor' >> monitoring.MonitorPredictions(
      problem, feature_stats.read_stats(stats_path), config,
      monitoring.drift_thresholds(opts))
  counted = dead_letters | 'CountDeadLetters' >> monitoring.DeadLetterCounts(
      config)
  outputs['metrics'] = (
      monitored['quality'] | 'TagPredictionRows' >> beam.Map(
          lambda row: {'type': 'predictions', **row}),
      monitored['drift'] | 'TagDriftRows' >> beam.Map(
          lambda row: {'type': 'drift', **row}),
      counted['counts']) | 'MergeMetrics' >> beam.Flatten()
  outputs['alerts'] = monitored['alerts']
  outputs['late'] = (
      monitored['late'] | 'TagLateScored' >> beam.Map(
          lambda row: {'stage': 'monitor', **row}),
      counted['late'] | 'TagLateDeadLetters' >> beam.Map(
          lambda row: {'stage': 'dead_letter_counts', **row})
  ) | 'MergeMonitorLate' >> beam.Flatten()
  for name in ('metrics', 'alerts', 'late'):
    _write_rows(outputs[name], f'Monitor{name.capitalize()}', names[name],
                opts)
  return outputs


def _with_shadows(opts: ServeOptions, names: dict[str, str],
                  scored: dict[str, Any], outputs: dict[str, Any]
                  ) -> dict[str, Any]:
  """With a registry, the shadows' answers to the shadow topic and their
  agreement with the live answers, per window and pair, to the metrics
  topic (at least once, like the monitor's rows)."""
  if scored['shadow'] is None:
    return outputs
  kafka = opts.view_as(kafka_io.KafkaOptions)
  lost = scored['shadow'] | 'WriteShadowAnswers' >> kafka_io.WriteToKafka(
      kafka_io.bootstrap_servers(opts), names['shadow'],
      producer_config=kafka.producer_config, event_timestamps=False,
      give_up_s=kafka.give_up_s)
  _ = lost | 'LogUnwritableShadowAnswers' >> beam.FlatMap(
      kafka_io.log_unwritable, names['shadow'])
  config = windowing.WindowConfig(
      kind=windowing.WindowKind.FIXED, size=opts.monitor_window,
      allowed_lateness=opts.monitor_allowed_lateness)
  agreement = scored['agreement'] | 'ShadowAgreement' >> (
      monitoring.ShadowAgreement(config))
  _write_rows(agreement['rows'], 'Agreement', names['metrics'], opts)
  return dict(outputs, shadow=scored['shadow'], agreement=agreement['rows'])


def _write_rows(rows, label: str, topic: str, opts: ServeOptions) -> None:
  """Monitor rows to ``topic``, keyed by what they measure and their window
  (``Key<label>``, ``Write<label>``, ``LogUnwritable<label>``: step names
  a Flink savepoint restores by)."""
  kafka = opts.view_as(kafka_io.KafkaOptions)
  unwritable = (
      rows
      | f'Key{label}' >> beam.Map(lambda row: (_row_key(row), row))
      | f'Write{label}' >> kafka_io.WriteToKafka(
          kafka_io.bootstrap_servers(opts), topic,
          producer_config=kafka.producer_config, event_timestamps=False,
          give_up_s=kafka.give_up_s))
  _ = unwritable | f'LogUnwritable{label}' >> beam.FlatMap(
      kafka_io.log_unwritable, topic)


def _row_key(row: dict[str, Any]) -> str:
  """A monitor row's Kafka key: what it measures, for whom, which window."""
  what = row.get('feature') or row.get('metric') or row.get('stage') or (
      row.get('type'))
  return f"{row.get('model_key', '')}/{what}@{row.get('window_start_s', '')}"


def _enrichment_dead_letter(problem: Problem,
                            element: tuple[EventContext, Record],
                            errors: list[dict]) -> tuple[str, dict]:
  """An event whose reference join failed, as a dead letter at its
  event's time."""
  context, record = element
  return at_event_time(problem, context, record, context.dead_letter(
      '; '.join(e['reason'] for e in errors), 'Enrich'))


def _prediction_output(kv: tuple[str, dict], topic: str) -> kafka_io.Output:
  source = kv[1]['source']
  return kafka_io.Output(topic, kv[0], kv[1], (source['topic'],
                                                source['partition'],
                                                source['offset']))


def _dead_letter_output(kv: tuple[str, dict], topic: str) -> kafka_io.Output:
  letter = kv[1]
  return kafka_io.Output(topic, kv[0], letter, (letter['topic'],
                                                letter['partition'],
                                                letter['offset']))


def _unwritable_dead_letter(unwritable: kafka_io.Unwritable, topic: str
                            ) -> tuple[str, dict]:
  """A prediction the output topic refused, as a dead letter."""
  key = unwritable.key if isinstance(unwritable.key, str) else repr(
      unwritable.key)[:1024]
  value = unwritable.value if isinstance(unwritable.value, dict) else {}
  source = value.get('source') or {}
  return key, kafka_io.dead_letter(
      kafka_io.KafkaRecord(source.get('topic'), source.get('partition'),
                           source.get('offset'), key.encode('utf-8', 'replace'),
                           None, source.get('timestamp_ms', -1)),
      [{'field': '*', 'value': None,
        'reason': f'writing to {topic!r} failed: {unwritable.reason}'}],
      stage='WritePredictions')


def start(argv: Optional[list[str]] = None):
  """Builds and starts the serving job; returns without waiting."""
  options = ServeOptions(runner_options.resolve(
      sys.argv[1:] if argv is None else argv, streaming=True))
  options.view_as(StandardOptions).streaming = True
  opts = options.view_as(ServeOptions)
  model_topic = opts.view_as(kafka_io.KafkaOptions).model_topic
  if not opts.model_dir and not model_topic:
    raise SystemExit('pipelines.serve: --model_dir or --model_topic is '
                     'required')
  if opts.plan and not model_topic:
    raise SystemExit('pipelines.serve: --plan needs --model_topic (the '
                     'models of a plan come from the registry)')
  problem = problem_lib.load(
      options.view_as(problem_lib.ProblemOptions).problem)
  pipeline = beam.Pipeline(options=options)
  build(pipeline, opts, problem)
  names = topics(problem, opts.view_as(kafka_io.KafkaOptions))
  print(f'[serve] {problem.name}: {kafka_io.bootstrap_servers(opts)} '
        f'{names["input"]} -> {names["output"]} (dead letters: '
        f'{names["dead_letters"]}), models from '
        f'{opts.model_dir or "registry " + model_topic}',
        file=sys.stderr, flush=True)
  if model_topic:
    print(f'[serve] plan: {opts.plan or "single " + model_name(problem, opts)} '
          f'(a plan on {model_topic} overrides it); shadows -> '
          f'{names["shadow"]}, model events -> {names["model_events"]}',
          file=sys.stderr, flush=True)
  if options.view_as(monitoring.MonitorOptions).training_stats:
    print(f'[serve] monitor: {opts.monitor_window:g} s windows -> '
          f'{names["metrics"]} (alerts: {names["alerts"]}, late: '
          f'{names["late"]})', file=sys.stderr, flush=True)
  return pipeline.run()


def run(argv: Optional[list[str]] = None):
  """Runs the serving job until cancelled (or for ``--run_seconds``)."""
  argv = sys.argv[1:] if argv is None else argv
  run_seconds = ServeOptions(argv).view_as(ServeOptions).run_seconds
  result = start(argv)
  # Not wait_until_finish: see runners.jobs.
  state = jobs.wait(result, run_seconds)
  if run_seconds is not None and not PipelineState.is_terminal(state):
    result.cancel()
  return result


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  # RunInference's batcher logs a line of timings per bundle at INFO.
  logging.getLogger('apache_beam.transforms.util').setLevel(logging.WARNING)
  run()
