"""The Kafka flags the project's pipelines share, and their brokers.

Security: ``consumer_config`` / ``producer_config`` are passed to kafka-python,
e.g. ``{'security_protocol': 'SASL_SSL', 'sasl_mechanism': 'SCRAM-SHA-512',
'sasl_plain_username': ..., 'sasl_plain_password': 'env:KAFKA_PASSWORD',
'ssl_cafile': '/path/ca.pem'}``. They are pickled with the pipeline: pass file
paths, not ``ssl_context`` objects, and give secrets as ``env:NAME`` or
``file:/path`` references, resolved where each client is made
(``clients.resolve_secrets``), so no job file or graph holds them.
"""

from __future__ import annotations

import json
import os

from typing import Optional

from apache_beam.options.pipeline_options import (FlinkRunnerOptions,
                                                  KafkaStreamsRunnerOptions,
                                                  PipelineOptions,
                                                  StandardOptions)

_BEAM_DEFAULT_BOOTSTRAP = 'localhost:9092'
AT_LEAST_ONCE = 'at_least_once'
EXACTLY_ONCE = 'exactly_once'


def bootstrap_servers(options: PipelineOptions) -> str:
  """The brokers a pipeline uses: Beam's own ``--bootstrap_servers`` flag.

  Beam already defines ``--bootstrap_servers`` (in
  ``KafkaStreamsRunnerOptions``, default ``localhost:9092``), so pipeline
  options cannot declare a flag of that name; they read it here. When the
  flag is left at its default, ``$KAFKA_BOOTSTRAP_SERVERS`` wins if set.
  """
  flag = options.view_as(KafkaStreamsRunnerOptions).bootstrap_servers
  if flag == _BEAM_DEFAULT_BOOTSTRAP and os.environ.get(
      'KAFKA_BOOTSTRAP_SERVERS'):
    return os.environ['KAFKA_BOOTSTRAP_SERVERS']
  return flag


class KafkaOptions(PipelineOptions):
  """The Kafka flags every pipeline of the project shares.

  Declared once, here: Beam parses the flags of every registered options
  class together, and argparse rejects a flag declared twice, so a pipeline
  that redeclared ``--input_topic`` could not be imported next to another.
  Defaults marked "per pipeline" are filled in by each pipeline.
  """

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--input_topic', default=None,
                        help='Topic of raw JSON events (default per '
                        'pipeline: <problem>-events).')
    parser.add_argument('--output_topic', default=None,
                        help='Topic the job writes (default per pipeline).')
    parser.add_argument('--dead_letter_topic', default=None,
                        help='Topic of events that failed, with reasons '
                        '(default per pipeline: <problem>-dead-letters).')
    parser.add_argument('--late_topic', default=None,
                        help='Records too late for their window or TTL '
                        '(serve monitor, analytics, quality); default per '
                        'pipeline.')
    parser.add_argument('--alerts_topic', default=None,
                        help='Alerts (serve, analytics, quality); default '
                        '<problem>-alerts.')
    parser.add_argument('--metrics_topic', default=None,
                        help='Serving monitor rows (drift, prediction '
                        'distribution, dead letters per window); default '
                        '<problem>-metrics.')
    parser.add_argument('--model_topic', default=None,
                        help='The model registry (compacted): serve follows '
                        'it instead of --model_dir, train publishes to it '
                        '(models.registry).')
    parser.add_argument('--shadow_topic', default=None,
                        help='Shadow models\' answers; default '
                        '<problem>-shadow.')
    parser.add_argument('--model_events_topic', default=None,
                        help='Models loaded and rejected by serving '
                        'workers, and promotions; default '
                        '<problem>-model-events.')
    parser.add_argument('--group_id', default=None,
                        help='Consumer group whose committed offsets a '
                        'restarted job resumes from (default per pipeline).')
    parser.add_argument('--start', choices=['earliest', 'latest'],
                        default='earliest',
                        help='Where to start without a committed offset.')
    parser.add_argument('--max_out_of_orderness', type=float, default=None,
                        help='Seconds: a partition\'s watermark is the max '
                        'event time seen minus this (default per pipeline).')
    parser.add_argument('--idle_timeout_s', type=float, default=30.0,
                        help='Seconds a caught-up partition waits without '
                        'records before its watermark follows the wall '
                        'clock (so an idle partition does not hold windows '
                        'and timers back).')
    parser.add_argument('--consumer_config', type=json.loads, default={},
                        help='JSON of extra kafka-python consumer settings '
                        '(security_protocol, sasl_*, ssl_*...).')
    parser.add_argument('--producer_config', type=json.loads, default={},
                        help='JSON of extra kafka-python producer settings.')
    parser.add_argument('--delivery', choices=[AT_LEAST_ONCE, EXACTLY_ONCE],
                        default=AT_LEAST_ONCE,
                        help='at_least_once: outputs are flushed, then '
                        'offsets committed (a restart may repeat some); '
                        'exactly_once: outputs and offsets are committed in '
                        'one Kafka transaction per bundle (read the outputs '
                        'with isolation_level=read_committed).')
    parser.add_argument('--partition_discovery_s', type=float, default=60.0,
                        help='Seconds between looks for partitions added to '
                        'the input topic while the job runs (0: never).')
    parser.add_argument('--kafka_readers', type=int, default=None,
                        help='How many restrictions read the input '
                        'partitions: 0 = one per partition, as Java '
                        'KafkaIO (default, except on Prism and Flink); N = '
                        'the partitions dealt to N, each read by one '
                        'consumer polling all of its partitions. Prism '
                        'default: 1; Flink default: --parallelism if given, '
                        'else 1 (with one restriction per partition, one '
                        'partition waited while another read or waited in '
                        'its poll).')
    parser.add_argument('--give_up_s', type=float, default=600.0,
                        help='Seconds the Kafka source and sinks wait out an '
                        'unreachable broker (reconnecting, with a log line) '
                        'before they fail with an error.')


def readers(options: PipelineOptions) -> Optional[int]:
  """``ReadFromKafka(readers=...)`` for a pipeline's input: ``--kafka_readers``
  (0: one per partition), else one per partition (spread over a cluster's
  workers, as Java KafkaIO) except on the runners whose workers run in one
  place, where one consumer polls every partition, as a hand-written loop
  does (``benchmarks/serve_bench.py``):

  * Flink: ``--parallelism`` (else 1). Its portable runner processes one
    bundle at a time per worker, so with a restriction per partition each
    partition waited while another one read for up to a checkpoint interval
    (serving p99 over 1 s at 1,000 events/s).
  * Prism: 1. Its workers are this process. It put both partitions'
    restrictions in one bundle, where a read waiting in its poll for the
    next record of its partition held back the other partition's records
    (serving p95 54 ms at 100 events/s, 6 ms with one reader).
  """
  flag = options.view_as(KafkaOptions).kafka_readers
  if flag is not None:
    return flag or None
  runner = _runner(options)
  if 'prism' in runner:
    return 1
  if 'flink' not in runner:
    return None
  parallelism = options.view_as(FlinkRunnerOptions).parallelism
  return parallelism if parallelism and parallelism > 0 else 1


def finalizes_promptly(options: PipelineOptions) -> bool:
  """Whether the pipeline's runner finalizes a bundle soon after it ends,
  so that ``ReadFromKafka`` may commit offsets in a bundle-finalization
  callback. Not Flink's: its portable runner finalizes bundles only when the
  next checkpoint completes (``--checkpointing_interval``, 10 s here), and
  the Python worker keeps each bundle's DoFns until then, so every new
  bundle set up new ones: a new Kafka consumer (110 ms to position) and new
  producers, about 180 ms before the read began (serving p99 139 ms at 10
  events/s, ``benchmarks/serve_bench.py``). There the read commits when a
  partition resumes, as on runners that never finalize."""
  return 'flink' not in _runner(options)


def _runner(options: PipelineOptions) -> str:
  """The pipeline's ``--runner``, lower case ('' when unset)."""
  return (options.view_as(StandardOptions).runner or '').lower()
