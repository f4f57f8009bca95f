"""Which partitions a read covers: found at launch, and while it runs.

``DiscoverPartitions`` (after an ``Impulse``) emits the read's partitions at
launch, each a (topic, partition, start, stop) spec, in groups: one group
per partition, or ``readers`` groups (``partitions.group_specs``); each
group is one element of the reading DoFn. ``WatchPartitions`` does the same
for an unbounded read of whole topics, then looks again every
``partition_discovery_s`` seconds and emits the partitions added since, one
group each (as Java KafkaIO's ``withDynamicRead`` and Flink's partition
discovery do).

The partitions already emitted live in the splittable DoFn's *restriction*
(as Java's ``Watch.growthOf`` keeps its growth state), so they survive
checkpoints and restarts from a checkpoint on every runner. Not in user
state: Prism (Beam 2.7x) runs bundles of one key concurrently, each with its
own copy of the state, and a partition would be emitted - and read - twice.

A partition found after launch starts at the group's committed offset, else
at its earliest offset (not ``auto_offset_reset``: every record in it is new
to the job). A look while the broker is unreachable is skipped with a log
line; the partitions already emitted are read on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.kafka_io.clients import is_retriable
from transforms.kafka_io.partitions import (Group, Spec, _peers, _ReadConfig,
                                            group_key, group_specs,
                                            list_partitions,
                                            resolve_partitions)

_LOGGER = logging.getLogger(__name__)


def _launch_partitions(config: _ReadConfig) -> list[Spec]:
  specs = resolve_partitions(config)
  _LOGGER.info('Reading %d Kafka partitions: %s', len(specs), specs)
  return specs


def _groups(config: _ReadConfig, specs: list[Spec],
            readers: Optional[int]) -> list[Group]:
  """``specs`` as the reading DoFn's elements, registered with the read's
  ``PeerWatermarks`` before any is read."""
  groups = group_specs(specs, readers)
  _peers(config).register(group_key(group) for group in groups)
  return groups


class DiscoverPartitions(beam.DoFn):
  """Impulse -> every partition of the read, resolved at launch."""

  def __init__(self, config: _ReadConfig):
    self._config = config

  def process(self, unused_impulse) -> Iterator[Group]:
    config = self._config
    yield from _groups(config, _launch_partitions(config), config.readers)


@dataclasses.dataclass(frozen=True)
class _Emitted:
  """The restriction of ``WatchPartitions``: the partitions emitted so far.

  ``stopped`` marks the primary of a checkpoint: it emits nothing more.
  """
  partitions: frozenset = frozenset()
  launched: bool = False
  stopped: bool = False


class _EmittedTracker(RestrictionTracker):
  """Claims sets of new partitions; splits only to checkpoint."""

  def __init__(self, restriction: _Emitted):
    self._restriction = restriction

  def current_restriction(self) -> _Emitted:
    return self._restriction

  def try_claim(self, partitions: frozenset) -> bool:
    if self._restriction.stopped:
      return False
    self._restriction = _Emitted(self._restriction.partitions | partitions,
                                 launched=True)
    return True

  def try_split(self, fraction_of_remainder):
    if fraction_of_remainder > 0 or self._restriction.stopped:
      return None
    residual = self._restriction
    self._restriction = dataclasses.replace(residual, stopped=True)
    return self._restriction, residual

  def current_progress(self) -> RestrictionProgress:
    return RestrictionProgress(completed=0, remaining=1)

  def check_done(self) -> None:
    if not self._restriction.stopped:
      raise ValueError('WatchPartitions ended without a checkpoint')

  def is_bounded(self) -> bool:
    return False


class _EmittedProvider(RestrictionProvider):

  def initial_restriction(self, element) -> _Emitted:
    return _Emitted()

  def create_tracker(self, restriction) -> _EmittedTracker:
    return _EmittedTracker(restriction)

  def restriction_size(self, element, restriction) -> float:
    return 1

  def truncate(self, element, restriction):
    return None  # on drain, stop looking


class WatchPartitions(beam.DoFn):
  """Impulse -> every partition of the topics, those added later included."""

  def __init__(self, config: _ReadConfig):
    self._config = config
    self._added = Metrics.counter(config.metrics_namespace,
                                  'partitions_added')

  @beam.DoFn.unbounded_per_element()
  def process(
      self, unused_impulse,
      tracker=beam.DoFn.RestrictionParam(_EmittedProvider()),
      watermark=beam.DoFn.WatermarkEstimatorParam(
          ManualWatermarkEstimator.default_provider())) -> Iterator[Group]:
    config = self._config
    restriction = tracker.current_restriction()
    if not restriction.launched:
      specs = _launch_partitions(config)
      groups = _groups(config, specs, config.readers)
    else:
      specs = self._new_partitions(restriction.partitions)
      groups = _groups(config, specs, None)
    if tracker.try_claim(frozenset((t, p) for t, p, _, _ in specs)):
      # The watermark follows the clock, so the reads downstream are not
      # held back by this one. The specs keep the impulse's timestamp (the
      # minimum), as after DiscoverPartitions: on Prism, a spec stamped
      # "now" holds its partition's records (event times in the past)
      # from ever closing a window.
      now = Timestamp.now()
      watermark.set_watermark(max(now, watermark.current_watermark() or now))
      yield from groups
      tracker.defer_remainder(
          Duration.of(self._config.partition_discovery_s))

  def _new_partitions(self, emitted: frozenset) -> list[Spec]:
    config = self._config
    try:
      new = list_partitions(config) - emitted
      if not new:
        return []
      specs = resolve_partitions(dataclasses.replace(
          config, partitions=tuple(sorted(new)),
          auto_offset_reset='earliest', give_up_s=0.0))
    except Exception as e:  # pylint: disable=broad-except
      _LOGGER.warning('Kafka partition discovery skipped (%s: %r); next '
                      'look in %.0fs',
                      'broker unreachable' if is_retriable(e) or
                      is_retriable(e.__cause__) else 'error', e,
                      config.partition_discovery_s)
      return []
    _LOGGER.info('Kafka partitions added while running, now read: %s', specs)
    self._added.inc(len(specs))
    return specs
