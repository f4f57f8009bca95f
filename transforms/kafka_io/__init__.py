"""A Python-native Kafka source and sink for Beam, built on kafka-python.

Why not ``apache_beam.io.kafka``: that is a cross-language transform that
needs a Java expansion service and a Java SDK harness on every worker. This
package is plain Python (a splittable ``DoFn`` plus a producer ``DoFn``), so it
runs unchanged on the DirectRunner, Prism, Flink (portable) and Dataflow.

Modules (each imports only those above it; none imports the rest of the
project, ``transforms.decode`` decodes the records):

* ``record``: ``KafkaRecord``, ``KafkaBatch``, ``METRICS_NAMESPACE``.
* ``options``: ``KafkaOptions`` (the shared flags), ``bootstrap_servers``.
* ``clients``: how clients wait out an unreachable broker.
* ``event_time``: a record's event time.
* ``watermarks``: per-partition watermarks (``WatermarkPolicy``).
* ``partitions``: the partitions and offsets of a read; offset commits.
* ``discovery``: the partitions a read covers, at launch and while running.
* ``read_partitions``: the splittable DoFn reading a partition.
* ``reader``: ``ReadFromKafka``; delivery guarantees.
* ``writer``: ``WriteToKafka`` (and its ``Unwritable`` output).
* ``dead_letters``: ``dead_letter``, ``original_bytes``, ``WriteDeadLetters``.
* ``transactions``: ``WriteTransactionally`` (exactly-once).

Example (events are JSON objects with their event time in ``created_at``,
Unix seconds)::

    problem = problem_lib.load('houses')
    events = (p
              | 'ReadSales' >> kafka_io.ReadFromKafka(
                  'broker:9092', ['sales'], group_id='serve',
                  event_time='created_at')
              | 'DecodeSales' >> decode.DecodeEvents(problem))
    events.dead_letters | 'WriteDeadLetters' >> kafka_io.WriteDeadLetters(
        'broker:9092', 'sales-dead-letters')
"""

from apache_beam.utils.timestamp import MIN_TIMESTAMP

from transforms.kafka_io.dead_letters import (WriteDeadLetters, dead_letter,
                                              original_bytes)
from transforms.kafka_io.event_time import (EventTimeFn, JsonFieldEventTime,
                                            event_time_fn, kafka_timestamp)
from transforms.kafka_io.options import (AT_LEAST_ONCE, EXACTLY_ONCE,
                                         KafkaOptions, bootstrap_servers,
                                         readers)
from transforms.kafka_io.partitions import UNBOUNDED_STOP, resolve_partitions
from transforms.kafka_io.reader import ReadFromKafka
from transforms.kafka_io.record import (METRICS_NAMESPACE, KafkaBatch,
                                       KafkaRecord)
from transforms.kafka_io.watermarks import (PartitionWatermarkEstimator,
                                            PeerWatermarks, WatermarkPolicy,
                                            policy_from_flags)
from transforms.kafka_io.transactions import Output, WriteTransactionally
from transforms.kafka_io.writer import (Unwritable, WriteToKafka,
                                        log_unwritable)

__all__ = [
    'JsonFieldEventTime', 'KafkaBatch', 'KafkaRecord',
    'PartitionWatermarkEstimator', 'PeerWatermarks', 'ReadFromKafka',
    'Unwritable', 'original_bytes', 'Output', 'WriteTransactionally',
    'log_unwritable',
    'AT_LEAST_ONCE', 'EXACTLY_ONCE',
    'WatermarkPolicy', 'policy_from_flags', 'WriteDeadLetters',
    'WriteToKafka', 'bootstrap_servers',
    'dead_letter', 'event_time_fn', 'kafka_timestamp',
    'readers', 'resolve_partitions',
]
