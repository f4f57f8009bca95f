"""A seeded generator of malformed and extreme Kafka messages.

``messages(problem, events, n_bad, seed)`` interleaves good events with bad
ones of many kinds (structure, types, sizes up to ~1 MB, encodings, numeric
edge values, keys, headers, tombstones) and says which is which, so a test
can demand exactly one prediction per good message and exactly one dead
letter per bad one. Good messages include valid extremes too (unknown huge
fields, unseen categories, UTF-16 JSON, binary keys and headers).
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple, Optional, Sequence

from transforms.problem import DType, Kind, Problem


class Message(NamedTuple):
  key: Optional[bytes]
  value: Optional[bytes]
  headers: list[tuple[str, bytes]]
  good: bool
  kind: str
  event_id: Optional[str] = None  # good messages: the prediction's id


def _dumps(event: Any) -> bytes:
  return json.dumps(event).encode('utf-8')


def _with_raw(event: dict, field: str, raw: bytes) -> bytes:
  """The event's JSON with ``field`` set to the raw JSON text ``raw``
  (last, so it wins over the event's own value)."""
  return _dumps(event)[:-1] + b', "%s": %s}' % (field.encode('utf-8'), raw)


def _numeric(problem: Problem) -> list:
  return [f for f in problem.serving_features
          if f.dtype is not DType.STRING and f.kind is not Kind.EVENT_TIME]


def _strings(problem: Problem) -> list:
  return [f for f in problem.serving_features if f.dtype is DType.STRING]


def _bad(problem: Problem, rng: random.Random, event: dict) -> tuple[str, Any]:
  """(kind, value bytes or None) of one bad message."""
  numeric = _numeric(problem)
  strings = _strings(problem)
  feature = rng.choice(numeric)
  field = feature.name
  beyond = ([1e308, -1e308, 3.5e38] if feature.dtype is DType.FLOAT
            else [1e19, -1e19, 2**63, 1e308])
  time_field = problem.event_time.field
  dropped = rng.choice([f.name for f in problem.serving_features
                        if f.required])
  kinds = [
      ('deep-nesting', lambda: b'[' * 100_000 + b']' * 100_000),
      ('deep-object', lambda: b'{"a":' * 5_000 + b'1' + b'}' * 5_000),
      ('truncated-json', lambda: _dumps(event)[:rng.randrange(
          1, len(_dumps(event)) - 1)]),
      ('random-bytes', lambda: b'\xff' + rng.randbytes(rng.randrange(0, 2000))),
      ('empty', lambda: b''),
      ('json-scalar', lambda: rng.choice(
          [b'null', b'42', b'"text"', b'[1, 2]', b'true', b'[]', b'1e999'])),
      ('tombstone', lambda: None),
      ('wrong-type-number', lambda: _dumps(dict(event, **{
          field: rng.choice(['12', True, [1], {'v': 1}])}))),
      ('huge-number', lambda: _with_raw(event, field, b'9' * 400)),
      ('non-finite', lambda: _with_raw(event, field, rng.choice(
          [b'NaN', b'Infinity', b'-Infinity', b'1e999']))),
      ('beyond-float32-or-int64', lambda: _dumps(dict(event, **{
          field: rng.choice(beyond)}))),
      ('missing-required', lambda: _dumps(
          {k: v for k, v in event.items() if k != dropped})),
      ('invalid-utf8-in-json', lambda: _dumps(event).replace(
          b'{', b'{"x": "\xc3\x28\xff", ', 1)),
      ('one-mb-bad', lambda: _dumps(dict(event, **{
          field: 'x' * rng.randrange(500_000, 950_000)}))),
      ('not-an-object', lambda: _dumps([event])),
  ]
  if strings:
    name = rng.choice(strings).name
    kinds += [
        ('string-as-number', lambda: _dumps(dict(event, **{name: 5}))),
        ('lone-surrogate', lambda: _with_raw(event, name, b'"\\ud800"')),
    ]
  if time_field is not None:
    kinds += [('event-time-out-of-range', lambda: _dumps(dict(event, **{
        time_field: rng.choice([10**12, -5, 10**30, 1e300])})))]
  # Sizes: ~1 MB values are costly; keep a few.
  weights = [0.3 if kind == 'one-mb-bad' else (
      1 if kind not in ('deep-nesting', 'deep-object') else 0.5)
             for kind, _ in kinds]
  kind, make = rng.choices(kinds, weights=weights)[0]
  return kind, make()


def _good(problem: Problem, rng: random.Random, event: dict
          ) -> tuple[str, bytes]:
  strings = _strings(problem)
  optional = [f.name for f in problem.serving_features
              if not f.required and f.name in event]
  dropped = set(rng.sample(optional, min(2, len(optional))))
  kinds = [
      ('plain', lambda: _dumps(event)),
      ('unknown-big-field', lambda: _dumps(dict(
          event, notes='n' * rng.randrange(1000, 300_000)))),
      ('unknown-nested-field', lambda: _dumps(dict(
          event, extra=json.loads('[' * 200 + ']' * 200)))),
      ('utf16-json', lambda: json.dumps(event).encode('utf-16')),
      ('optional-missing', lambda: _dumps(
          {k: v for k, v in event.items() if k not in dropped})),
  ]
  if strings:
    name = rng.choice(strings).name
    kinds.append(('unseen-category', lambda: _dumps(
        dict(event, **{name: 'never-seen-\u00e9\u4e2d\U0001F695'}))))
  kind, make = rng.choice(kinds)
  return kind, make()


def _key(rng: random.Random) -> Optional[bytes]:
  return rng.choice([None, b'', rng.randbytes(16), b'k' * 100_000,
                     'cl\u00e9'.encode('utf-8')])


def _headers(rng: random.Random) -> list[tuple[str, bytes]]:
  return rng.choice([[], [('trace', rng.randbytes(8))],
                     [('h', b''), ('h', b'\x00' * 100)]])


def messages(problem: Problem, events: Sequence[tuple[str, dict]],
             n_bad: int, seed: int = 0) -> list[Message]:
  """The good ``events`` (id, event) in order, with ``n_bad`` bad
  messages spread among them; good ones are keyed by their id."""
  rng = random.Random(seed)
  out = []
  bad_left = n_bad
  for i, (event_id, event) in enumerate(events):
    share = bad_left // max(1, len(events) - i)
    for _ in range(share):
      kind, value = _bad(problem, rng, event)
      key = _key(rng)
      if value is None and key is None:
        key = b'tombstone'  # Kafka needs a key or a value
      out.append(Message(key, value, _headers(rng), False, kind))
    bad_left -= share
    kind, value = _good(problem, rng, event)
    out.append(Message(event_id.encode('utf-8'), value, _headers(rng), True,
                       kind, event_id))
  return out
