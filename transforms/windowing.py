"""Event-time windowing of records, with late data as an explicit output.

``WindowedAggregates(problem, config)`` takes timestamped ``records.Record``s
(event time from the problem's event-time field, ``AssignEventTime``) and
returns two PCollections:

* ``'stats'``: one JSON-ready dict per key, window and pane: the count and
  the problem's aggregates (``<field>_count``, ``_sum``, ``_mean``, ``_min``,
  ``_max``, ratios such as the taxi tip rate), the window (ISO and epoch
  seconds) and the pane (timing EARLY / ON_TIME / LATE, index, is_last);
* ``'late'``: every record that arrived after the watermark had passed the end
  of its window plus the allowed lateness, with the reason and the window it
  missed. Counted by ``Metrics.counter('windowing', 'too_late')``.

Why a splitter in front of the GroupByKey
-----------------------------------------
Beam's GroupByKey drops elements whose window expired (watermark past window
end + allowed lateness) without telling the pipeline (Java only bumps a
``droppedDueToLateness`` counter; the Python SDK not even that), and a Python
DoFn cannot read the watermark. So ``SplitLate`` decides lateness *before*
the GroupByKey, from what event-time timers tell it:

1. It runs in the global window (its elements can never expire, so no runner
   drops them before it sees them) as a stateful DoFn keyed by a shard
   (``config.shards``, default 1, so every element meets the same knowledge).
2. It keeps a "clock" event-time timer on the lattice of window expiry times
   (``window.max_timestamp() + allowed_lateness``; every window size, or
   period, or session gap). A timer at ``T`` fires only once the input
   watermark is ``>= T``, so the last fired time ``K`` is a proven lower bound
   of the watermark.
3. An element whose window expires at ``T <= K`` is provably too late: it goes
   to ``'late'`` and never reaches the aggregation. Every other element is
   forwarded. For sliding windows the decision is per window: an element can
   be aggregated in its newer windows and late for its older ones.
4. ``K`` can trail the real watermark by up to one lattice step plus the time
   the runner takes to fire the timer. The aggregation therefore keeps its
   windows open ``lateness_margin`` longer than ``allowed_lateness`` (default
   one lattice step), so an element the splitter forwarded is not dropped by
   the GroupByKey. Lateness is thus judged once, by the splitter, and an
   element is either aggregated or in ``'late'``.
5. The clock stops at the end of time (bounded input or drain) and, when no
   element arrived for a while, takes exponentially longer steps, so it costs
   a handful of timers per window period and terminates.

``WindowWithLateOutput`` is the reusable part (the splitter and the
``WindowInto``) for any element type; ``transforms.monitoring`` windows scored
events with it. On the Python DirectRunner a pane is never marked
``is_last`` (its trigger driver does not implement the end-of-lateness
pane); runners that do (Prism, Dataflow, Flink) mark the final one.

Example::

    cfg = WindowConfig(kind='fixed', size=3600, allowed_lateness=7200,
                       early_every=10, late_every=1)
    out = timestamped_records | WindowedAggregates(problem, cfg)
    out['stats'] | WriteStats(...); out['late'] | WriteLate(...)
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import zlib
from typing import Any, Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.coders import BooleanCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import trigger as T
from apache_beam.transforms import userstate
from apache_beam.transforms import window as W
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

from transforms import records as R
from transforms.problem import Op, Problem
from transforms.records import Record

LATE_TAG = 'late'
_NAMESPACE = 'windowing'
# After this many clock ticks without an element, the clock doubles its step.
_IDLE_TICKS = 16


class WindowKind(enum.Enum):
  FIXED = 'fixed'
  SLIDING = 'sliding'
  SESSION = 'session'


class Accumulation(enum.Enum):
  ACCUMULATING = 'accumulating'
  DISCARDING = 'discarding'


@dataclasses.dataclass(frozen=True)
class WindowConfig:
  """How records are windowed and when panes fire. Times are in seconds.

  Attributes:
    kind: fixed, sliding or session windows.
    size: window length (fixed and sliding).
    period: how often a sliding window starts.
    gap: inactivity gap that closes a session.
    allowed_lateness: how long after the watermark passed a window's end its
      late elements are still aggregated (LATE panes); later ones go to the
      late output.
    early_every: processing-time seconds between EARLY panes while the window
      is open; 0 for no early panes.
    late_every: a LATE pane after every N late elements (>= 1; late
      elements are never held back without a pane, see ``margin``).
    accumulation: accumulating (every pane holds the whole window so far) or
      discarding (every pane holds only what arrived since the last pane).
    key: the raw feature the aggregates are grouped by; None: the problem's
      ``entity_key`` (or one group, ``'all'``, if it has none).
    shards: parallelism of the lateness splitter (see module docstring).
    lateness_margin: extra time the aggregation keeps windows open beyond
      allowed_lateness; None for one clock step.
  """
  kind: WindowKind = WindowKind.FIXED
  size: float = 3600
  period: float = 300
  gap: float = 1800
  allowed_lateness: float = 7200
  early_every: float = 0
  late_every: int = 1
  accumulation: Accumulation = Accumulation.ACCUMULATING
  key: Optional[str] = None
  shards: int = 1
  lateness_margin: Optional[float] = None

  def __post_init__(self):
    # Accept the flag spellings ('fixed', 'discarding') as well as the enums.
    object.__setattr__(self, 'kind', WindowKind(self.kind))
    object.__setattr__(self, 'accumulation', Accumulation(self.accumulation))
    if min(self.size, self.period, self.gap) <= 0:
      raise ValueError('size, period and gap must be positive')
    if self.kind is WindowKind.SLIDING and self.period > self.size:
      raise ValueError('sliding period must not exceed the window size')
    if self.allowed_lateness < 0 or self.early_every < 0:
      raise ValueError('allowed_lateness and early_every must be >= 0')
    if self.late_every < 1:
      raise ValueError('late_every must be >= 1')
    if self.shards < 1:
      raise ValueError('shards must be >= 1')

  @property
  def step(self) -> float:
    """Distance between successive window expiry times (the clock step)."""
    return {WindowKind.FIXED: self.size, WindowKind.SLIDING: self.period,
            WindowKind.SESSION: self.gap}[self.kind]

  @property
  def margin(self) -> float:
    return self.step if self.lateness_margin is None else self.lateness_margin

  def window_fn(self) -> W.WindowFn:
    if self.kind is WindowKind.FIXED:
      return W.FixedWindows(self.size)
    if self.kind is WindowKind.SLIDING:
      return W.SlidingWindows(self.size, self.period)
    return W.Sessions(self.gap)

  def trigger(self) -> T.TriggerFn:
    early = (T.AfterProcessingTime(self.early_every) if self.early_every
             else None)
    # Always a late trigger: the aggregation accepts late data for at least
    # the margin, even with allowed_lateness=0.
    return T.AfterWatermark(early=early, late=T.AfterCount(self.late_every))

  def accumulation_mode(self):
    return (T.AccumulationMode.ACCUMULATING
            if self.accumulation is Accumulation.ACCUMULATING
            else T.AccumulationMode.DISCARDING)


# ---------------------------------------------------------------- plain logic

class WindowOptions(PipelineOptions):
  """The windowing flags of the jobs that window (analytics, quality): one
  per ``WindowConfig`` field."""

  @classmethod
  def _add_argparse_args(cls, parser):
    defaults = WindowConfig()
    parser.add_argument('--window', choices=[k.value for k in WindowKind],
                        default=defaults.kind.value)
    parser.add_argument('--size', type=float, default=defaults.size,
                        help='Window length, seconds (fixed, sliding).')
    parser.add_argument('--period', type=float, default=defaults.period,
                        help='Sliding window period, seconds.')
    parser.add_argument('--gap', type=float, default=defaults.gap,
                        help='Session gap, seconds.')
    parser.add_argument('--allowed_lateness', type=float,
                        default=defaults.allowed_lateness,
                        help='Seconds after the window end that late data '
                        'is still aggregated (LATE panes).')
    parser.add_argument('--early_every', type=float,
                        default=defaults.early_every,
                        help='Processing-time seconds between EARLY panes; '
                        '0 for none.')
    parser.add_argument('--late_every', type=int, default=defaults.late_every,
                        help='A LATE pane after every N late elements.')
    parser.add_argument('--accumulation',
                        choices=[a.value for a in Accumulation],
                        default=defaults.accumulation.value)
    parser.add_argument('--key', default=defaults.key,
                        help='Raw feature the aggregates are grouped by '
                        '(default: the problem\'s entity key).')
    parser.add_argument('--shards', type=int, default=defaults.shards,
                        help='Parallelism of the late-data splitter.')
    parser.add_argument('--lateness_margin', type=float, default=None,
                        help='Extra seconds windows stay open past the '
                        'allowed lateness; default one window step.')


def window_config(options: PipelineOptions) -> WindowConfig:
  """The ``WindowConfig`` the windowing flags describe."""
  opts = options.view_as(WindowOptions)
  return WindowConfig(
      kind=opts.window, size=opts.size, period=opts.period, gap=opts.gap,
      allowed_lateness=opts.allowed_lateness, early_every=opts.early_every,
      late_every=opts.late_every, accumulation=opts.accumulation,
      key=opts.key, shards=opts.shards, lateness_margin=opts.lateness_margin)


def expiry_micros(window: W.BoundedWindow, allowed_lateness: float) -> int:
  """When ``window`` expires: the GroupByKey drops its elements after this."""
  return (window.max_timestamp() + Duration.of(allowed_lateness)).micros


def iso(ts_micros: int) -> str:
  """UTC ISO-8601 with a Z, to the second (or finer when needed)."""
  dt = datetime.datetime.fromtimestamp(ts_micros / 1e6, datetime.timezone.utc)
  text = dt.isoformat(timespec='seconds' if ts_micros % 1_000_000 == 0
                      else 'microseconds')
  return text.replace('+00:00', 'Z')


def window_fields(window: W.BoundedWindow) -> dict[str, Any]:
  """Window bounds as ISO strings and epoch seconds."""
  start, end = window.start.micros, window.end.micros
  return {'window_start': iso(start), 'window_end': iso(end),
          'window_start_s': start / 1e6, 'window_end_s': end / 1e6}


def pane_fields(pane: PaneInfo) -> dict[str, Any]:
  """The pane as JSON: timing EARLY/ON_TIME/LATE, index, first/last."""
  return {'timing': PaneInfoTiming.to_string(pane.timing),
          'pane_index': pane.index, 'is_first': pane.is_first,
          'is_last': pane.is_last}


def shard_of(key: Any, shards: int) -> int:
  """A stable shard for ``key`` (Python's hash() is salted per process)."""
  return zlib.crc32(repr(key).encode('utf-8')) % shards


def late_event(key_name: str, key: Any, values: dict[str, Any],
               window: W.BoundedWindow, event_time_micros: int,
               watermark_micros: int, allowed_lateness: float
               ) -> dict[str, Any]:
  """The JSON record of an element routed to the late output.

  ``values`` is the element as JSON (for records, ``Record.values``).
  """
  return {
      'reason': 'watermark passed window end + allowed lateness',
      'key_name': key_name, 'key': key,
      'event_time': iso(event_time_micros),
      'event_time_s': event_time_micros / 1e6,
      'watermark_at_least': iso(watermark_micros),
      'allowed_lateness_s': allowed_lateness,
      **window_fields(window),
      'record': values,
  }


def new_aggregate(problem: Problem) -> list[float]:
  """An empty accumulator: [count, then per aggregate field count, sum, min,
  max, then per ratio numerator and denominator sums]."""
  return ([0] + [0, 0.0, None, None] * len(problem.aggregates)
          + [0.0, 0.0] * len(problem.ratios))


def add_record(problem: Problem, acc: list, record: Record) -> list:
  """Adds one record; absent fields (an unlabelled event's label) are
  skipped, so ``<field>_count`` says how many records had it."""
  acc[0] += 1
  i = 1
  for aggregate in problem.aggregates:
    if not R.is_missing(record, aggregate.field):
      x = float(record.values[aggregate.field])
      acc[i] += 1
      acc[i + 1] += x
      acc[i + 2] = x if acc[i + 2] is None else min(acc[i + 2], x)
      acc[i + 3] = x if acc[i + 3] is None else max(acc[i + 3], x)
    i += 4
  for ratio in problem.ratios:
    if not (R.is_missing(record, ratio.numerator)
            or R.is_missing(record, ratio.denominator)):
      acc[i] += float(record.values[ratio.numerator])
      acc[i + 1] += float(record.values[ratio.denominator])
    i += 2
  return acc


def merge_aggregates(problem: Problem, accs: Iterable[list]) -> list:
  accs = iter(accs)
  first = next(accs, None)
  if first is None:
    # No accumulators at all: an empty pane (see DropEmptyPanes).
    return new_aggregate(problem)
  merged = list(first)
  for acc in accs:
    merged[0] += acc[0]
    i = 1
    for _ in problem.aggregates:
      merged[i] += acc[i]
      merged[i + 1] += acc[i + 1]
      for j, pick in ((i + 2, min), (i + 3, max)):
        if acc[j] is not None:
          merged[j] = acc[j] if merged[j] is None else pick(merged[j], acc[j])
      i += 4
    for _ in problem.ratios:
      merged[i] += acc[i]
      merged[i + 1] += acc[i + 1]
      i += 2
  return merged


def summarize(problem: Problem, acc: list) -> dict[str, Any]:
  """count, ``<field>_count`` and ``<field>_<op>`` per aggregate, ratios."""
  out: dict[str, Any] = {'count': acc[0]}
  i = 1
  for aggregate in problem.aggregates:
    n, total, low, high = acc[i:i + 4]
    values = {Op.SUM: total, Op.MEAN: total / n if n else None,
              Op.MIN: low, Op.MAX: high}
    out[f'{aggregate.field}_count'] = n
    for op in aggregate.ops:
      out[f'{aggregate.field}_{op.value}'] = values[op]
    i += 4
  for ratio in problem.ratios:
    numerator, denominator = acc[i:i + 2]
    out[ratio.name] = numerator / denominator if denominator else None
    i += 2
  return out


def window_result(key_name: str, key: Any, summary: dict[str, Any],
                  window: W.BoundedWindow, pane: PaneInfo) -> dict[str, Any]:
  """One output row: key, window, pane and the aggregates."""
  return {'key_name': key_name, 'key': key, **window_fields(window),
          **pane_fields(pane), **summary}


# ---------------------------------------------------------------- transforms

class AggregateFn(beam.CombineFn):
  """Combines records into the ``summarize`` dict of their problem."""

  def __init__(self, problem: Problem):
    self._problem = problem

  def create_accumulator(self) -> list:
    return new_aggregate(self._problem)

  def add_input(self, acc: list, record: Record) -> list:
    return add_record(self._problem, acc, record)

  def merge_accumulators(self, accs: Iterable[list]) -> list:
    return merge_aggregates(self._problem, accs)

  def extract_output(self, acc: list) -> dict[str, Any]:
    return summarize(self._problem, acc)


class _Forwarded(NamedTuple):
  """An element on its way to the aggregation, in one window (or session)."""
  key: Any
  element: Any
  window: Optional[tuple[int, int]]   # (start, end) micros; None: sessions


ALL = 'all'


class RecordKey:
  """``record.values[name]``: the grouping key of a Record (None: 'all')."""

  def __init__(self, name: Optional[str]):
    self.name = name

  def __call__(self, record: Record) -> Any:
    return ALL if self.name is None else record.values[self.name]


def record_values(record: Record) -> dict[str, Any]:
  """How a late Record is written: its typed values."""
  return record.values


class _KeepChosenWindowFn(beam.DoFn):
  """Keeps an element only in the window ``SplitLate`` chose for it.

  Sliding windows are split per window by ``SplitLate``: each copy it
  forwards names one window that has not expired, and the ``WindowInto``
  before this step puts every copy in all of its windows. Filtering here,
  rather than assigning the chosen window with a custom ``WindowFn``, keeps
  the windowing strategy one that Java runners know (Flink's GroupByKey
  rejects a pickled Python ``WindowFn``).
  """

  def process(self, forwarded, window=beam.DoFn.WindowParam):
    if forwarded.window == (window.start.micros, window.end.micros):
      yield forwarded


class _SplitLateFn(beam.DoFn):
  """Stateful splitter; see the module docstring for the argument."""

  WATERMARK = userstate.ReadModifyWriteStateSpec('watermark', VarIntCoder())
  NEXT_TICK = userstate.ReadModifyWriteStateSpec('next_tick', VarIntCoder())
  STRIDE = userstate.ReadModifyWriteStateSpec('stride', VarIntCoder())
  IDLE = userstate.ReadModifyWriteStateSpec('idle', VarIntCoder())
  ENDED = userstate.ReadModifyWriteStateSpec('ended', BooleanCoder())
  CLOCK = userstate.TimerSpec('clock', userstate.TimeDomain.WATERMARK)
  END = userstate.TimerSpec('end', userstate.TimeDomain.WATERMARK)

  def __init__(self, config: WindowConfig, key_name: str, describe):
    self._config = config
    self._key_name = key_name
    self._describe = describe
    self._window_fn = config.window_fn()
    self._step = Duration.of(config.step).micros
    self._end = W.GlobalWindow().max_timestamp().micros

  def process(self, element, timestamp=beam.DoFn.TimestampParam,
              watermark=beam.DoFn.StateParam(WATERMARK),
              next_tick=beam.DoFn.StateParam(NEXT_TICK),
              stride=beam.DoFn.StateParam(STRIDE),
              idle=beam.DoFn.StateParam(IDLE),
              ended=beam.DoFn.StateParam(ENDED),
              clock=beam.DoFn.TimerParam(CLOCK),
              end=beam.DoFn.TimerParam(END)):
    _, (key, value) = element
    cfg = self._config
    known = watermark.read()
    windows = self._window_fn.assign(
        W.WindowFn.AssignContext(timestamp, element=value))
    expiries = [expiry_micros(w, cfg.allowed_lateness) for w in windows]
    if not ended.read():
      if next_tick.read() is None:
        # Start the clock at this element's earliest expiry: on the lattice.
        self._set_clock(min(expiries), clock, next_tick, stride)
        end.set(Timestamp(micros=self._end))
      elif (stride.read() or 1) > 1:
        # Elements again after a quiet spell: back to one tick per step.
        self._set_clock(known + self._step, clock, next_tick, stride)
    idle.write(0)
    for window, expires in zip(windows, expiries):
      if known is not None and expires <= known:
        yield beam.pvalue.TaggedOutput(LATE_TAG, late_event(
            self._key_name, key, self._describe(value), window,
            timestamp.micros, known, cfg.allowed_lateness))
        continue
      bounds = (None if cfg.kind is WindowKind.SESSION
                else (window.start.micros, window.end.micros))
      yield _Forwarded(key, value, bounds)

  @userstate.on_timer(CLOCK)
  def on_clock(self, fired=beam.DoFn.TimestampParam,
               watermark=beam.DoFn.StateParam(WATERMARK),
               next_tick=beam.DoFn.StateParam(NEXT_TICK),
               stride=beam.DoFn.StateParam(STRIDE),
               idle=beam.DoFn.StateParam(IDLE),
               ended=beam.DoFn.StateParam(ENDED),
               clock=beam.DoFn.TimerParam(CLOCK)):
    watermark.write(fired.micros)     # the watermark is at least here
    if ended.read():
      return
    idle_ticks = (idle.read() or 0) + 1
    idle.write(idle_ticks)
    # While elements arrive, tick every expiry; when idle, back off so a
    # quiet stream (or the jump to the end of time) costs few timers.
    factor = 1 if idle_ticks <= _IDLE_TICKS else min(
        2 * (stride.read() or 1), 1 << 40)
    tick = fired.micros + factor * self._step
    if tick < self._end:
      self._set_clock(tick, clock, next_tick, stride, factor)

  @staticmethod
  def _set_clock(tick: int, clock, next_tick, stride, factor: int = 1):
    clock.set(Timestamp(micros=tick))
    next_tick.write(tick)
    stride.write(factor)

  @userstate.on_timer(END)
  def on_end(self, watermark=beam.DoFn.StateParam(WATERMARK),
             ended=beam.DoFn.StateParam(ENDED),
             clock=beam.DoFn.TimerParam(CLOCK)):
    watermark.write(self._end)
    ended.write(True)
    clock.clear()


class _CountFn(beam.DoFn):
  """Counts elements into ``Metrics.counter('windowing', name)``."""

  def __init__(self, name: str):
    self._counter = Metrics.counter(_NAMESPACE, name)

  def process(self, element):
    self._counter.inc()
    yield element


class WindowWithLateOutput(beam.PTransform):
  """Timestamped elements -> windowed ``(key, element)`` and late dicts.

  The reusable part of this module: ``SplitLate`` then ``WindowInto`` with the
  config's window, trigger, accumulation and lateness (+ margin). Returns
  ``{'windowed': PCollection[(key, element)], 'late': PCollection[dict]}``;
  group or combine ``'windowed'`` per key to get panes.

  Args:
    config: the windowing.
    key_fn: element -> grouping key; default ``record.values[config.key]``.
    key_name: name of the key in late records; default ``config.key``
      (or 'all').
    describe: element -> JSON dict for late records; default
      ``record.values``.
  """

  def __init__(self, config: WindowConfig, key_fn=None,
               key_name: Optional[str] = None, describe=None):
    super().__init__()
    self._config = config
    self._key_fn = key_fn or RecordKey(config.key)
    self._key_name = key_name or config.key or ALL
    self._describe = describe or record_values

  def expand(self, elements):
    cfg, key_fn = self._config, self._key_fn
    split = (
        elements
        # The splitter must live in the global window: elements there never
        # expire, so no runner drops a late one before it is judged.
        | 'RewindowGlobally' >> beam.WindowInto(W.GlobalWindows())
        | 'KeyByShard' >> beam.Map(
            lambda e: (shard_of(key_fn(e), cfg.shards), (key_fn(e), e))
        ).with_output_types(beam.typehints.Tuple[int, Any])
        | 'SplitLate' >> beam.ParDo(
            _SplitLateFn(cfg, self._key_name, self._describe)).with_outputs(
                LATE_TAG, main='forwarded'))
    windowed = (
        split.forwarded
        | 'CountForwarded' >> beam.ParDo(_CountFn('forwarded'))
        | 'WindowForwarded' >> beam.WindowInto(
            cfg.window_fn(),
            trigger=cfg.trigger(),
            accumulation_mode=cfg.accumulation_mode(),
            allowed_lateness=Duration.of(cfg.allowed_lateness + cfg.margin)))
    if cfg.kind is not WindowKind.SESSION:
      windowed = windowed | 'KeepChosenWindow' >> beam.ParDo(
          _KeepChosenWindowFn())
    windowed = windowed | 'KeyForwarded' >> beam.Map(
        lambda f: (f.key, f.element))
    late = split[LATE_TAG] | 'CountTooLate' >> beam.ParDo(_CountFn('too_late'))
    return {'windowed': windowed, 'late': late}


class _DropEmptyPanesFn(beam.DoFn):

  def __init__(self, count_of):
    self._count_of = count_of
    self._dropped = Metrics.counter(_NAMESPACE, 'empty_panes_dropped')

  def process(self, element):
    if self._count_of(element[1]):
      yield element
    else:
      self._dropped.inc()


class DropEmptyPanes(beam.PTransform):
  """Combined ``(key, output)`` panes -> the same, less those of no element.

  Why: the Python SDK fires every window's on-time pane, even an empty one
  (``OnTimeBehavior.FIRE_ALWAYS`` is hard-wired in ``WindowInto``). Flink
  fires a window's end-of-window and garbage-collection timers one at a
  time; when the watermark passes both at once (a job restored from a
  checkpoint, an idle partition's jump to the wall clock), the second firing
  finds the window's state already cleared and emits a second "on-time,
  first and last" pane with nothing in it (Flink merges no accumulators).
  A reader that keeps a window's newest pane then replaced the real total
  with zero: the restored analytics job of the fault tests counted 0, 68,
  75 and 200 of 300 events in four runs. A pane of no element says nothing,
  so no runner emits one here.

  Args:
    count_of: the combined output -> how many elements went into it.
  """

  def __init__(self, count_of):
    super().__init__()
    self._count_of = count_of

  def expand(self, panes):
    return panes | 'DropEmptyPanes' >> beam.ParDo(
        _DropEmptyPanesFn(self._count_of))


class _FormatPaneFn(beam.DoFn):
  def __init__(self, key_name: str, accumulation: Accumulation):
    self._key_name = key_name
    self._accumulation = accumulation.value
    self._panes = {t: Metrics.counter(_NAMESPACE, f'panes_{t.lower()}')
                   for t in ('EARLY', 'ON_TIME', 'LATE', 'UNKNOWN')}

  def process(self, element, window=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    key, summary = element
    row = window_result(self._key_name, key, summary, window, pane)
    # Readers need it to find a window's total: the last pane, or the sum.
    row['accumulation'] = self._accumulation
    self._panes[row['timing']].inc()
    yield row


class WindowedAggregates(beam.PTransform):
  """Timestamped records -> {'stats': pane dicts, 'late': late dicts}.

  Grouped by ``config.key``, else the problem's entity key, else one group.
  """

  def __init__(self, problem: Problem, config: WindowConfig):
    super().__init__()
    key = config.key or problem.entity_key
    if key is not None and key not in problem.features_by_name:
      raise ValueError(f'{problem.name} has no feature {key!r} to group by')
    self._problem = problem
    self._config = dataclasses.replace(config, key=key)

  def expand(self, records):
    split = records | 'WindowRecords' >> WindowWithLateOutput(self._config)
    stats = (split['windowed']
             | 'CombineRecords' >> beam.CombinePerKey(
                 AggregateFn(self._problem))
             | 'NonEmpty' >> DropEmptyPanes(lambda summary: summary['count'])
             | 'FormatPanes' >> beam.ParDo(_FormatPaneFn(
                 self._config.key or ALL, self._config.accumulation)))
    return {'stats': stats, 'late': split['late']}


class AssignEventTime(beam.PTransform):
  """Records -> the same records timestamped with their event time.

  A problem without an event-time field keeps the input's timestamps (the
  Kafka timestamp of streamed events).
  """

  def __init__(self, problem: Problem):
    super().__init__()
    self._problem = problem

  def expand(self, records):
    problem = self._problem
    if problem.event_time.field is None:
      return records
    return records | 'TimestampByEventTime' >> beam.Map(
        lambda r: beam.window.TimestampedValue(r, R.event_seconds(problem, r)))
