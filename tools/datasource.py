"""Send a dataset to a data topic, then the control message that trains on
it, as Kafka-ML's datasources do.

    python -m tools.datasource --problem hcopd --input data/hcopd.csv \\
        --topic hcopd-data --format avro --deployment_id hcopd-1 \\
        [--control_topic hcopd-control] [--validation_rate 0.2] \\
        [--publish_state live]

The rows (a CSV file in the problem's layout, or a pandas DataFrame from
Python: ``send(problem, df, ...)``) are encoded in ``--format``
(``transforms.formats``: json, csv, avro, avro_confluent), written with an
idempotent producer (a progress line every second), and the offsets the
broker gave them become the control message's range, so the training reads
exactly these messages (``pipelines.control``)::

    {"deployment_id": "hcopd-1", "problem": "hcopd", "topic": "hcopd-data",
     "input_format": "avro", "input_config": {"avro_schema": {...}},
     "validation_rate": 0.2, "total_msg": 239,
     "ranges": {"0": [0, 239]}, "publish_state": "live"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Mapping, Optional, Sequence

from tools import replay
from transforms import formats
from transforms import problem as problem_lib
from transforms import records as R
from transforms.kafka_io import clients
from transforms.problem import Problem


def rows_to_events(problem: Problem, rows: Any) -> list[dict[str, Any]]:
  """Raw events from a CSV path, a pandas DataFrame or dicts of strings."""
  if isinstance(rows, str):
    return [event for _, event in replay.load_events(problem, rows)]
  if hasattr(rows, 'to_dict'):  # a DataFrame
    rows = rows.astype(object).where(rows.notna(), '').astype(str).to_dict(
        'records')
  return [R.csv_row_to_event(problem, row) for row in rows]


def send(problem: Problem, rows: Any, topic: str, bootstrap_servers: str,
         event_format: formats.EventFormat = formats.EventFormat(),
         producer_config: Optional[Mapping[str, Any]] = None,
         progress=sys.stderr) -> dict[str, Any]:
  """Writes the rows to ``topic``; returns ``{'total_msg', 'ranges':
  {partition: [first, last + 1]}}`` of what the broker acknowledged."""
  from kafka import KafkaProducer
  events = rows_to_events(problem, rows)
  producer = KafkaProducer(**{
      **clients.producer_config(bootstrap_servers, 'rtml-datasource'),
      **clients.resolve_secrets(producer_config or {})})
  ranges: dict[int, list[int]] = {}
  futures = []
  last = time.monotonic()
  try:
    for i, event in enumerate(events):
      futures.append(producer.send(
          topic, value=event_format.encode(problem, event)))
      if progress and time.monotonic() - last > 1:
        last = time.monotonic()
        progress.write(f'[datasource] {i + 1}/{len(events)} messages\n')
        progress.flush()
    producer.flush()
    for future in futures:
      meta = future.get(timeout=60)
      span = ranges.setdefault(meta.partition, [meta.offset, meta.offset + 1])
      span[0] = min(span[0], meta.offset)
      span[1] = max(span[1], meta.offset + 1)
    # Partitions that got none of these rows: an empty range, so a reader
    # of the range does not read their older messages.
    for partition in producer.partitions_for(topic) or ():
      if partition not in ranges:
        end = _end_offset(bootstrap_servers, topic, partition,
                          producer_config)
        ranges[partition] = [end, end]
  finally:
    producer.close()
  if progress:
    progress.write(f'[datasource] {len(events)} messages to {topic!r} '
                   f'({event_format.name}), offsets {ranges}\n')
    progress.flush()
  return {'total_msg': len(events),
          'ranges': {str(p): span for p, span in sorted(ranges.items())}}


def _end_offset(bootstrap_servers: str, topic: str, partition: int,
                producer_config: Optional[Mapping[str, Any]]) -> int:
  from kafka import KafkaConsumer, TopicPartition
  tp = TopicPartition(topic, partition)
  security = {k: v for k, v in (producer_config or {}).items()
              if k.startswith(('security_', 'sasl_', 'ssl_'))}
  consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers,
                           **clients.resolve_secrets(security))
  try:
    return consumer.end_offsets([tp])[tp]
  finally:
    consumer.close()


def control_message(problem: Problem, deployment_id: str, topic: str,
                    sent: Mapping[str, Any],
                    event_format: formats.EventFormat,
                    validation_rate: float = 0.2,
                    publish_state: str = 'candidate',
                    model_name: Optional[str] = None) -> dict[str, Any]:
  config = {}
  if event_format.schema is not None:
    config['avro_schema'] = dict(event_format.schema)
  if event_format.schema_id is not None:
    config['schema_id'] = event_format.schema_id
  return {'deployment_id': deployment_id, 'problem': problem.name,
          'topic': topic, 'input_format': event_format.name,
          'input_config': config, 'validation_rate': validation_rate,
          'total_msg': sent['total_msg'], 'ranges': dict(sent['ranges']),
          'publish_state': publish_state,
          **({'model_name': model_name} if model_name else {})}


def send_control(bootstrap_servers: str, topic: str,
                 message: Mapping[str, Any],
                 producer_config: Optional[Mapping[str, Any]] = None) -> None:
  from models import registry
  registry.publish(bootstrap_servers, topic,
                   [(message['deployment_id'], dict(message))],
                   producer_config)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tools.datasource',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT)
  parser.add_argument('--input', required=True, help='CSV file.')
  parser.add_argument('--topic', default=None,
                      help='Data topic; default <problem>-data.')
  parser.add_argument('--format', choices=formats.FORMATS,
                      default=formats.JSON)
  parser.add_argument('--avro_schema', default=None)
  parser.add_argument('--schema_id', type=int, default=None)
  parser.add_argument('--deployment_id', default=None,
                      help='Send the control message for this deployment '
                      '(none: the data only).')
  parser.add_argument('--control_topic', default=None,
                      help='Default <problem>-control.')
  parser.add_argument('--validation_rate', type=float, default=0.2)
  parser.add_argument('--publish_state', choices=('candidate', 'live'),
                      default='candidate')
  parser.add_argument('--model_name', default=None)
  parser.add_argument('--bootstrap_servers', default=None)
  parser.add_argument('--producer_config', type=json.loads, default={})
  args = parser.parse_args(argv)
  problem = problem_lib.load(args.problem)
  bootstrap = replay.bootstrap_or_exit(args.bootstrap_servers, 'tools.datasource')
  event_format = formats.EventFormat.of(problem, args.format,
                                        args.avro_schema, args.schema_id)
  topic = args.topic or problem.topic('data')
  sent = send(problem, args.input, topic, bootstrap, event_format,
              args.producer_config)
  if args.deployment_id:
    message = control_message(problem, args.deployment_id, topic, sent,
                              event_format, args.validation_rate,
                              args.publish_state, args.model_name)
    control = args.control_topic or problem.topic('control')
    send_control(bootstrap, control, message, args.producer_config)
    print(json.dumps(message))
  return 0


if __name__ == '__main__':
  sys.exit(main())
