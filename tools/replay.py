"""Replays a problem's CSV file into Kafka as JSON events.

A plain producer program (not a Beam pipeline): each CSV row becomes the JSON
event ``records.csv_row_to_event`` defines (the problem's features, typed),
keyed by an event id: the problem's ``event_id`` field, else
``<file stem>-<line number>`` (stable across replays, also added as
``event_id``). The Kafka timestamp is the event time, when the problem has
one, so consumers can use either as event time. Rows are sent as they are -
a bad row stays bad and becomes a dead letter in the consumer.

Run (brokers: the flag, else $KAFKA_BOOTSTRAP_SERVERS, else the broker of
``make kafka-up``)::

    python -m tools.replay --input data/taxi_trips.csv \\
        --bootstrap_servers 127.0.0.1:9092 --rate 500 --order event_time
    python -m tools.replay --problem houses --input data/houses.csv \\
        --topic houses-eval --split eval --eval_percent 20 --limit 1000

The topic defaults to the problem's ``<name>-events``.

A missing topic is created (``--partitions``) with ``retention.ms=-1``:
Kafka's time retention compares record timestamps with the wall clock, so
historical trips would otherwise be deleted within minutes.

From Python (tests, notebooks)::

    from tools import replay
    from transforms import problem
    taxi = problem.load('taxi')
    events = replay.load_events(taxi, 'data/taxi_trips.csv', limit=100)
    replay.replay(taxi, events, 'taxi-events', '127.0.0.1:9092', rate=None)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, TextIO

from transforms import problem as problem_lib
from transforms import records
from transforms.kafka_io import clients
from transforms.problem import Problem

EVENT_ID_KEY = 'event_id'


def event_id(path: str, line_number: int) -> str:
  """Stable id of a CSV row: ``<file stem>-<line number>`` (header = 1)."""
  return f'{pathlib.Path(path).stem}-{line_number}'


def event_time_ms(problem: Problem, event: Mapping[str, Any]) -> Optional[int]:
  """The Kafka timestamp of an event: its event time in ms, if valid."""
  spec = problem.event_time
  if spec.field is None:
    return None
  try:
    seconds = spec.raw_seconds(event.get(spec.field))
  except ValueError:
    return None
  if not math.isfinite(seconds) or not 0 <= seconds < 253402300800:
    return None
  return int(round(seconds * 1000))


def load_events(problem: Problem, path: str, order: str = 'file',
                limit: Optional[int] = None, split: str = 'all',
                eval_percent: int = 20) -> list[tuple[str, dict[str, Any]]]:
  """CSV rows as ``(event_id, event)`` pairs, ready to replay.

  Args:
    problem: whose features the rows hold (and the CSV layout).
    path: a CSV file with the feature columns (``data/taxi_trips.csv``).
    order: 'file' (row order) or 'event_time' (by event time; rows without a
      valid event time last, in file order).
    limit: keep the first N events after splitting and ordering.
    split: 'all', 'train' or 'eval': the same deterministic split as the
      training pipeline (``records.is_eval`` on ``records.record_key``).
    eval_percent: percentage of rows in the eval split.
  """
  if order not in ('file', 'event_time'):
    raise ValueError(f'order must be file or event_time, got {order!r}')
  if split not in ('all', 'train', 'eval'):
    raise ValueError(f'split must be all, train or eval, got {split!r}')
  events = []
  with open(path, newline='', encoding='utf-8') as f:
    rows = list(records.csv_rows(problem, f))
  for line_number, row in rows:
    if split != 'all':
      in_eval = records.is_eval(records.record_key(problem, row),
                                eval_percent)
      if in_eval != (split == 'eval'):
        continue
    event = records.csv_row_to_event(problem, row)
    if problem.event_id is not None and problem.event_id in event:
      eid = str(event[problem.event_id])
    else:
      eid = event_id(path, line_number)
      event[EVENT_ID_KEY] = eid
    events.append((eid, event))
  if order == 'event_time':
    def by_time(item):
      ms = event_time_ms(problem, item[1])
      return (ms is None, ms or 0)
    events.sort(key=by_time)  # stable: file order within equal times
  return events[:limit] if limit is not None else events


class _Progress:
  """One stderr line per second: sent/total and events/s."""

  def __init__(self, total: int, stream: Optional[TextIO]):
    self._total = total
    self._stream = stream
    self._start = self._last = time.monotonic()
    self._tty = bool(stream) and stream.isatty()

  def update(self, sent: int, force: bool = False) -> None:
    now = time.monotonic()
    if self._stream is None or (not force and now - self._last < 1.0):
      return
    self._last = now
    rate = sent / max(now - self._start, 1e-9)
    width = 30
    done = int(width * sent / self._total) if self._total else width
    line = (f'[replay] [{"#" * done}{"." * (width - done)}] '
            f'{sent}/{self._total} events, {rate:,.0f} events/s')
    self._stream.write(('\r' + line) if self._tty else (line + '\n'))
    self._stream.flush()

  def close(self) -> None:
    if self._stream is not None and self._tty:
      self._stream.write('\n')


def replay(problem: Problem, events: Iterable[tuple[str, Mapping[str, Any]]],
           topic: str,
           bootstrap_servers: str, rate: Optional[float] = None,
           producer_config: Optional[Mapping[str, Any]] = None,
           progress: Optional[TextIO] = None,
           give_up_s: float = clients.DEFAULT_GIVE_UP_S) -> int:
  """Produces events to ``topic``; returns how many were acknowledged.

  A broker outage is waited out: unacknowledged events are retried by the
  producer, and the wait is reported every few seconds on ``progress``.

  Args:
    problem: the events' problem (their event time).
    events: ``(event_id, event)`` pairs, e.g. from ``load_events``.
    topic: target topic (must exist, or be auto-created by the broker).
    bootstrap_servers: 'host:port[,host:port]'.
    rate: events per second (paced against a schedule, so it catches up
      after a stall); None sends as fast as the producer allows.
    producer_config: extra kafka-python producer settings (security...).
    progress: a stream (sys.stderr) for the progress line and summary.
    give_up_s: how long an unreachable broker is waited for.

  Raises:
    RuntimeError: if any event was not acknowledged within ``give_up_s``.
  """
  from kafka import KafkaProducer
  events = list(events)
  config = clients.producer_config(bootstrap_servers, 'rtml-replay',
                                   give_up_s)
  config['linger_ms'] = 20
  config.update(producer_config or {})
  config = clients.resolve_secrets(config)
  producer = clients.with_retry(lambda: KafkaProducer(**config), give_up_s,
                                'replay')
  errors: list[BaseException] = []
  acked = [0]
  bar = _Progress(len(events), progress)
  start = time.monotonic()
  try:
    for i, (eid, event) in enumerate(events):
      if rate:
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
          time.sleep(ahead)
      future = producer.send(
          topic, key=eid.encode('utf-8'),
          value=json.dumps(event, separators=(',', ':')).encode('utf-8'),
          timestamp_ms=event_time_ms(problem, event))
      future.add_errback(errors.append)
      future.add_callback(lambda _: acked.__setitem__(0, acked[0] + 1))
      bar.update(i + 1)
    _wait_for_acks(producer, acked, len(events), give_up_s, progress, errors)
  finally:
    producer.close(timeout=10)
  elapsed = time.monotonic() - start
  bar.update(len(events), force=True)
  bar.close()
  if errors or acked[0] < len(events):
    raise RuntimeError(f'{len(events) - acked[0]} of {len(events)} events '
                       f'were not acknowledged within {give_up_s:.0f}s; '
                       f'first error: {errors[0] if errors else None!r}')
  if progress is not None:
    progress.write(f'[replay] {len(events)} events to {topic!r} in '
                   f'{elapsed:.1f}s: {len(events) / max(elapsed, 1e-9):,.0f} '
                   'events/s\n')
  return len(events)


def _wait_for_acks(producer: Any, acked: list, total: int, give_up_s: float,
                   progress: Optional[TextIO], errors: list) -> None:
  """Flushes, saying every 5 s how many events still wait for the broker."""
  from kafka.errors import KafkaTimeoutError
  deadline = time.monotonic() + give_up_s
  while acked[0] < total and time.monotonic() < deadline and not errors:
    try:
      producer.flush(timeout=5)
    except KafkaTimeoutError:
      pass
    if acked[0] < total and progress is not None:
      progress.write(f'[replay] waiting for the broker: {total - acked[0]} '
                     f'events not acknowledged yet\n')
      progress.flush()


def bootstrap_or_exit(flag: Optional[str], prog: str) -> str:
  """The broker of a tool: its flag, else the default; exits (status 2)
  with what to do when there is none."""
  bootstrap = flag or default_bootstrap_servers()
  if not bootstrap:
    print(f'{prog}: no broker: pass --bootstrap_servers, set '
          'KAFKA_BOOTSTRAP_SERVERS or run `make kafka-up`', file=sys.stderr)
    raise SystemExit(2)
  return bootstrap


def default_bootstrap_servers() -> Optional[str]:
  """$KAFKA_BOOTSTRAP_SERVERS, else the broker started by ``make kafka-up``."""
  if os.environ.get('KAFKA_BOOTSTRAP_SERVERS'):
    return os.environ['KAFKA_BOOTSTRAP_SERVERS']
  from runners import kafka
  state = kafka.status()
  return state['bootstrap_servers'] if state.get('running') else None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m tools.replay', description=__doc__.split('\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT,
                      help='The problem (see transforms.problem.load).')
  parser.add_argument('--input', required=True,
                      help='CSV file of the problem\'s rows.')
  parser.add_argument('--topic', default=None,
                      help='Default: <problem>-events.')
  parser.add_argument('--bootstrap_servers', default=None)
  parser.add_argument('--rate', type=float, default=None,
                      help='Events per second (default: as fast as possible).')
  parser.add_argument('--order', choices=['event_time', 'file'],
                      default='file')
  parser.add_argument('--limit', type=int, default=None)
  parser.add_argument('--split', choices=['all', 'train', 'eval'],
                      default='all')
  parser.add_argument('--eval_percent', type=int, default=20)
  parser.add_argument('--partitions', type=int, default=4,
                      help='Partitions of the topic if it must be created.')
  parser.add_argument('--producer_config', type=json.loads, default={},
                      help='JSON of extra kafka-python producer settings.')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  bootstrap = bootstrap_or_exit(args.bootstrap_servers, 'tools.replay')
  from runners import kafka
  problem = problem_lib.load(args.problem)
  topic = args.topic or problem.topic('events')
  kafka.create_topic(bootstrap, topic, args.partitions,
                     config={'retention.ms': '-1'},
                     # env:/file: references resolved here: runners.kafka
                     # knows nothing of the connector's conventions.
                     client_config=clients.resolve_secrets(
                         args.producer_config or {}))
  events = load_events(problem, args.input, args.order, args.limit,
                       args.split, args.eval_percent)
  replay(problem, events, topic, bootstrap, args.rate, args.producer_config,
         progress=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
