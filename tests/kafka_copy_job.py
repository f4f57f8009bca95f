"""A streaming copy job for the restart test: source topic -> sink topic.

It reads with a consumer group (offsets committed as bundles complete),
slows down on purpose (``--sleep_ms`` per record) so the test can kill it
mid-topic, and writes every record unchanged (same key and value)::

    python -m tests.kafka_copy_job --runner=DirectRunner --streaming \\
        --bootstrap_servers=127.0.0.1:9092 --source=in --sink=out \\
        --group_id=copy --sleep_ms=20
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import kafka_io


class CopyOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--source', required=True)
    parser.add_argument('--sink', required=True)
    # --group_id is a shared Kafka flag: kafka_io.KafkaOptions.
    parser.add_argument('--sleep_ms', type=float, default=0.0)


def build(pipeline: beam.Pipeline, opts: CopyOptions) -> None:
  bootstrap = kafka_io.bootstrap_servers(opts)
  sleep_s = opts.sleep_ms / 1000.0

  def slow_copy(record: kafka_io.KafkaRecord):
    time.sleep(sleep_s)
    return record.key, record.value

  _ = (pipeline
       | 'ReadSource' >> kafka_io.ReadFromKafka(
           bootstrap, opts.source,
           group_id=opts.view_as(kafka_io.KafkaOptions).group_id,
           checkpoint_interval_s=0.3, poll_timeout_s=0.3)
       | 'SlowCopy' >> beam.Map(slow_copy)
       | 'WriteSink' >> kafka_io.WriteToKafka(bootstrap, opts.sink))


def run(argv: Optional[list[str]] = None) -> None:
  options = PipelineOptions(argv)
  pipeline = beam.Pipeline(options=options)
  build(pipeline, options.view_as(CopyOptions))
  pipeline.run().wait_until_finish()


if __name__ == '__main__':
  run(sys.argv[1:])
