"""Reference tables joined into events: the join, its sources, the same
result in training and serving, and a table that follows a compacted topic
on the real broker."""

import dataclasses
import json
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import serve
from pipelines import train
from problems.houses_zip import PROBLEM as HOUSES_ZIP
from tests.flink_jobs import HARNESS_HANG_UP
from tests.topics import produce
from tools import replay
from transforms import enrichment
from transforms import records as R
from transforms.problem import Missing, ReferenceTable

TABLE = HOUSES_ZIP.references[0]
STRICT = dataclasses.replace(HOUSES_ZIP, references=(dataclasses.replace(
    TABLE, on_missing=Missing.DEAD_LETTER),))


def _strict_problem_file(tmp_path):
  """STRICT as a problem file, for the jobs' ``--problem``."""
  strict = tmp_path / 'strict.py'
  strict.write_text(
      'import dataclasses\n'
      'from problems.houses_zip import PROBLEM as Z\n'
      'from transforms.problem import Missing\n'
      'PROBLEM = dataclasses.replace(Z, references=(dataclasses.replace('
      'Z.references[0], on_missing=Missing.DEAD_LETTER),))\n')
  return strict


def _record(zip_code, **values):
  event = {'bedrooms': 3, 'bathrooms': 2, 'sqft_living': 1500,
           'yr_built': 1990, 'city': 'Seattle', 'statezip': zip_code,
           'date': '2014-05-02 00:00:00', **values}
  return R.parse_json(HOUSES_ZIP, event)


def _table(tmp_path, text, suffix='.csv'):
  path = tmp_path / f'zip{suffix}'
  path.write_text(text)
  return enrichment.load_file(HOUSES_ZIP, TABLE, str(path))


def test_a_hit_fills_the_fields_and_a_miss_keeps_the_defaults(tmp_path):
  table = _table(tmp_path, 'statezip,zip_median_price,zip_count\n'
                 'WA 98001,248000.5,57\n')
  record = _record('WA 98001')
  assert {'zip_median_price', 'zip_count'} <= set(record.missing)
  hit = enrichment.enrich(HOUSES_ZIP, record, {'statezip': table})
  assert (hit.values['zip_median_price'], hit.values['zip_count']) == (
      248000.5, 57.0)
  assert not {'zip_median_price', 'zip_count'} & set(hit.missing)
  miss = enrichment.enrich(HOUSES_ZIP, _record('WA 99999'),
                           {'statezip': table})
  assert (miss.values['zip_median_price'], miss.values['zip_count']) == (
      465000.0, 0.0)
  with pytest.raises(R.InvalidRecord, match="no statezip reference for "
                     "'WA 99999'"):
    enrichment.enrich(STRICT, _record('WA 99999'), {'statezip': table})


def test_an_as_of_table_gives_the_row_valid_at_the_event_time(tmp_path):
  """With valid_from, a key's rows are versions in time: the event gets the
  newest valid at its event time, and none before the first."""
  as_of = dataclasses.replace(HOUSES_ZIP, references=(dataclasses.replace(
      TABLE, valid_from='valid_from'),))
  path = tmp_path / 'zips.csv'
  path.write_text('statezip,zip_median_price,zip_count,valid_from\n'
                  'WA 98001,300000,9,2014-06-01 00:00:00\n'
                  'WA 98001,250000,5,2014-05-01 00:00:00\n')
  table = enrichment.load_file(as_of, as_of.references[0], str(path))
  tables = {'statezip': table}

  def price_on(date):
    return enrichment.enrich(as_of, _record('WA 98001', date=date),
                             tables).values['zip_median_price']
  assert price_on('2014-05-15 00:00:00') == 250000.0
  assert price_on('2014-06-01 00:00:00') == 300000.0  # valid from then on
  assert price_on('2014-07-01 00:00:00') == 300000.0
  assert price_on('2014-04-30 00:00:00') == 465000.0  # none yet: default
  strict = dataclasses.replace(as_of, references=(dataclasses.replace(
      as_of.references[0], on_missing=Missing.DEAD_LETTER),))
  with pytest.raises(R.InvalidRecord, match='valid at 2014-04-30T00:00:00Z'):
    enrichment.enrich(strict, _record('WA 98001', date='2014-04-30 00:00:00'),
                      tables)
  path.write_text('statezip,zip_median_price,zip_count,valid_from\n'
                  'WA 98001,300000,9,yesterday\n')
  with pytest.raises(ValueError, match=r'zips.csv:2: valid_from'):
    enrichment.load_file(as_of, as_of.references[0], str(path))


def test_json_lines_tables_and_bad_rows(tmp_path):
  table = _table(tmp_path, json.dumps({'statezip': 'WA 98002',
                                       'zip_median_price': 229500,
                                       'zip_count': 29}) + '\n', '.jsonl')
  assert table.rows == {'WA 98002': {'zip_median_price': 229500.0,
                                     'zip_count': 29.0}}
  assert table.version.startswith('file:')
  with pytest.raises(ValueError, match=r'zip.csv:2: zip_count=.*not a number'):
    _table(tmp_path, 'statezip,zip_median_price,zip_count\n'
           'WA 98001,1,many\n')


def test_sources_come_from_flags_or_the_table():
  assert enrichment.sources(HOUSES_ZIP) == {
      'statezip': 'data/houses_statezip.csv'}
  assert enrichment.sources(HOUSES_ZIP, ['statezip=topic:zips']) == {
      'statezip': 'topic:zips'}
  with pytest.raises(ValueError, match='no reference table'):
    enrichment.sources(HOUSES_ZIP, ['city=x.csv'])
  bare = dataclasses.replace(HOUSES_ZIP, references=(dataclasses.replace(
      TABLE, source=None),))
  with pytest.raises(ValueError, match='has no source'):
    enrichment.sources(bare)


def test_a_reference_field_must_be_an_optional_model_feature():
  with pytest.raises(ValueError, match='must be a model feature'):
    dataclasses.replace(HOUSES_ZIP, references=(ReferenceTable(
        'bad', 'statezip', ('price',)),))
  with pytest.raises(ValueError, match='is not a feature'):
    dataclasses.replace(HOUSES_ZIP, references=(ReferenceTable(
        'bad', 'zip', ('zip_count',)),))


def test_training_and_serving_join_alike():
  """The training stage and the serving stage, on the same raw events and
  the same reference file, give the same enriched records."""
  events = replay.load_events(HOUSES_ZIP, 'data/houses.csv', limit=300)
  records = []
  for _, event in events:
    try:
      records.append(R.parse_json(HOUSES_ZIP, event))
    except R.InvalidRecord:
      continue
  sources = enrichment.sources(HOUSES_ZIP)
  snapshot = {'statezip': enrichment.load_file(HOUSES_ZIP, TABLE,
                                               sources['statezip'])}
  expected = [enrichment.enrich(HOUSES_ZIP, r, snapshot) for r in records]
  assert sum(r.values['zip_count'] > 0 for r in expected) > 200
  with BeamPipeline() as p:
    split = {'train': p | 'Train' >> beam.Create(records[::2]),
             'eval': p | 'Eval' >> beam.Create(records[1::2]),
             'dead_letters': p | 'None' >> beam.Create([])}
    trained = train._enriched(HOUSES_ZIP, split, sources)
    # As serving joins: a poll's events at a time.
    events = [(serve.EventContext(f'e{i}', 't', 0, i, 0, 0), r)
              for i, r in enumerate(records)]
    served = (p | 'Events' >> beam.Create(
        [events[i:i + 64] for i in range(0, len(events), 64)])
              | 'Enrich' >> beam.ParDo(enrichment.Enrich(
                  HOUSES_ZIP, sources, None, record_of=lambda e: e[1],
                  with_record=lambda e, r, v: (r, v), batches=True))
              | 'Unbatch' >> beam.FlatMap(lambda batch: batch))
    both = (trained['train'], trained['eval']) | beam.Flatten()
    assert_that(both, equal_to(expected), label='Training')
    assert_that(served | beam.Map(lambda rv: rv[0]), equal_to(expected),
                label='Serving')
    assert_that(served | beam.Map(lambda rv: json.dumps(rv[1]))
                | beam.Distinct(),
                equal_to([json.dumps({'statezip': snapshot['statezip'].version})]),
                label='Versions')


def _zip_drift_of_analytics(tmp_path, training_records, input_args):
  """Runs the analytics job (one window over everything, drift against the
  statistics of ``training_records``): (its zip_median_price drift rows,
  its dead letters)."""
  from pipelines import analytics
  from tools import report
  from transforms import stats as S
  stats_path = tmp_path / 'stats.json'
  S.write_stats(S.compute_stats(HOUSES_ZIP, training_records),
                str(stats_path))
  out = tmp_path / 'out'
  analytics.run([*input_args, '--output_path', str(out), '--window', 'fixed',
                 '--size', str(400 * 24 * 3600),
                 '--training_stats', str(stats_path)])
  return ([r for r in report.load_rows(str(out), 'drift')
           if r['feature'] == 'zip_median_price'],
          report.load_rows(str(out), 'dead_letters'))


def test_analytics_joins_as_training_does(tmp_path):
  """The windowed-analytics job joins the same table: the drift monitor's
  window sees the joined zip figures, not the defaults; under the
  dead-letter policy a zip the table lacks is a dead letter."""
  with open('data/houses.csv', encoding='utf-8') as f:
    lines = [next(f) for _ in range(301)]
  csv_path = tmp_path / 'houses.csv'
  csv_path.write_text(''.join(lines))
  snapshot = {'statezip': enrichment.load_file(
      HOUSES_ZIP, TABLE, enrichment.sources(HOUSES_ZIP)['statezip'])}
  expected = []
  for _, row in R.csv_rows(HOUSES_ZIP, lines):
    try:
      expected.append(enrichment.enrich(
          HOUSES_ZIP, R.parse_csv_row(HOUSES_ZIP, row), snapshot))
    except R.InvalidRecord:
      continue
  assert sum(r.values['zip_count'] > 0 for r in expected) > 200
  rows, _ = _zip_drift_of_analytics(
      tmp_path, expected, ['--problem', 'houses_zip', '--input_csv',
                           str(csv_path)])
  assert sum(r['count'] for r in rows) == len(expected)
  # The monitor's mean is over present values: the joined ones.
  joined = [r.values['zip_median_price'] for r in expected
            if 'zip_median_price' not in r.missing]
  assert sum(r['present'] for r in rows) == len(joined) > 200
  mean = sum(r['mean'] * r['present'] for r in rows) / len(joined)
  assert mean == pytest.approx(sum(joined) / len(joined), rel=1e-6)
  # Under the dead-letter policy each zip the table lacks is a dead letter.
  strict_dir = tmp_path / 'strict'
  strict_dir.mkdir()
  _, letters = _zip_drift_of_analytics(
      strict_dir, expected, ['--problem', str(_strict_problem_file(tmp_path)),
                             '--input_csv', str(csv_path)])
  refused = [d for d in letters if d.get('stage') == 'Enrich']
  assert len(refused) == len(expected) - len(joined) > 0
  assert all('no statezip reference' in d['errors'][0]['reason']
             for d in refused)


@pytest.mark.integration
def test_analytics_from_kafka_joins_and_dead_letters_a_miss(
    kafka_bootstrap, kafka_topic, tmp_path):
  """From Kafka (bounded, DirectRunner): joined events reach the windows;
  under the dead-letter policy an unknown zip is a dead letter with its
  original bytes and the reason."""
  from transforms import kafka_io
  strict = _strict_problem_file(tmp_path)
  snapshot = {'statezip': enrichment.load_file(
      HOUSES_ZIP, TABLE, enrichment.sources(HOUSES_ZIP)['statezip'])}
  known = [(e, v) for e, v in replay.load_events(
      HOUSES_ZIP, 'data/houses.csv', limit=400)
           if v.get('statezip') in snapshot['statezip'].rows][:100]
  unknown = [(f'{e}-u', dict(v, statezip='WA 99999')) for e, v in known[:3]]
  topic = kafka_topic()
  payloads = {e: json.dumps(v).encode() for e, v in known + unknown}
  produce(kafka_bootstrap, topic, [(e.encode(), b) for e, b in
                                   payloads.items()])
  enriched = [enrichment.enrich(HOUSES_ZIP, R.parse_json(HOUSES_ZIP, v),
                                snapshot) for _, v in known]
  rows, letters = _zip_drift_of_analytics(
      tmp_path, enriched, ['--problem', str(strict), '--bootstrap_servers',
                           kafka_bootstrap, '--input_topic', topic,
                           '--bounded'])
  assert sum(r['present'] for r in rows) == len(known)
  assert sorted(d['key'] for d in letters) == sorted(e for e, _ in unknown)
  for letter in letters:
    assert kafka_io.original_bytes(letter) == payloads[letter['key']]
    assert letter['stage'] == 'Enrich'
    assert "no statezip reference for 'WA 99999'" in (
        letter['errors'][0]['reason'])


def _until(condition, timeout_s=30):
  deadline = time.monotonic() + timeout_s
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.05)
  return condition()


@pytest.mark.integration
def test_a_topic_table_follows_upserts_and_deletes(kafka_bootstrap,
                                                   kafka_topic):
  topic = kafka_topic()
  row = lambda price, n: json.dumps(
      {'zip_median_price': price, 'zip_count': n}).encode()
  produce(kafka_bootstrap, topic, [(b'WA 98001', row(100, 1)),
                                   (b'WA 98002', row(200, 2)),
                                   (b'WA 98003', b'{"zip_count": "x"}')])
  table = enrichment.TopicTable(HOUSES_ZIP, TABLE, kafka_bootstrap, topic)
  assert table.caught_up.wait(60)
  first = table.snapshot()
  assert first.rows == {'WA 98001': {'zip_median_price': 100.0,
                                     'zip_count': 1.0},
                        'WA 98002': {'zip_median_price': 200.0,
                                     'zip_count': 2.0}}
  assert first.version == f'{topic}@2'
  # An update and a delete while the table is in use.
  produce(kafka_bootstrap, topic, [(b'WA 98001', row(150, 3)),
                                   (b'WA 98002', None)])
  assert _until(lambda: table.snapshot().version == f'{topic}@4')
  assert table.snapshot().rows == {'WA 98001': {'zip_median_price': 150.0,
                                                'zip_count': 3.0}}
  enriched = enrichment.enrich(HOUSES_ZIP, _record('WA 98001'),
                               {'statezip': table.snapshot()})
  assert enriched.values['zip_median_price'] == 150.0
  with pytest.raises(R.InvalidRecord, match="no statezip reference"):
    enrichment.enrich(STRICT, _record('WA 98002'),
                      {'statezip': table.snapshot()})


@pytest.mark.integration
def test_a_topic_table_past_its_budget_says_so(kafka_bootstrap, kafka_topic):
  topic = kafka_topic()
  produce(kafka_bootstrap, topic, [
      (f'WA {98000 + i}'.encode(), json.dumps({'zip_count': i}).encode())
      for i in range(5)])
  table = enrichment.TopicTable(HOUSES_ZIP, TABLE, kafka_bootstrap, topic,
                                max_keys=3)
  assert table.caught_up.wait(60)
  with pytest.raises(R.InvalidRecord, match='more than its budget of 3 keys'):
    enrichment.enrich(HOUSES_ZIP, _record('WA 98001'),
                      {'statezip': table.snapshot()})


@pytest.fixture(scope='module')
def zip_model(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('houses-zip'))
  train.run(['--problem', 'houses_zip', '--output_dir', out, '--epochs',
             '2'])
  return out


@pytest.mark.integration
@HARNESS_HANG_UP
@pytest.mark.parametrize('runner', ['prism', 'flink'])
def test_serving_joins_a_topic_table_that_changes_while_events_flow(
    runner, zip_model, kafka_bootstrap, kafka_topic, tmp_path):
  import os
  import uuid
  from models import serving
  from tests.flink_jobs import stopping_job_servers
  from tests.topics import TopicReader
  strict = _strict_problem_file(tmp_path)
  reference = kafka_topic(suffix='zips')
  rows = {}
  import csv
  with open('data/houses_statezip.csv') as f:
    for row in csv.DictReader(f):
      rows[row['statezip']] = row
  produce(kafka_bootstrap, reference, [
      (k.encode(), json.dumps({'zip_median_price': float(r['zip_median_price']),
                               'zip_count': int(r['zip_count'])}).encode())
      for k, r in rows.items()])
  topics = {n: kafka_topic(suffix=n) for n in ('events', 'predictions', 'dlq')}
  events = [(e, v) for e, v in replay.load_events(
      HOUSES_ZIP, 'data/houses.csv', split='eval')
            if v.get('price') and v.get('statezip') in rows]
  known, changed = events[:20], events[20:40]
  zip_changed = changed[0][1]['statezip']
  changed = [(f'{e}-c', dict(v, statezip=zip_changed)) for e, v in changed]
  zip_deleted = next(z for z in rows if z != zip_changed)
  unknown = [(f'{e}-u', dict(v, statezip='WA 99999')) for e, v in events[60:63]]
  with stopping_job_servers():
    result = serve.start([
        '--problem', str(strict), '--runner', runner,
        '--bootstrap_servers', kafka_bootstrap,
        '--input_topic', topics['events'],
        '--output_topic', topics['predictions'],
        '--dead_letter_topic', topics['dlq'],
        '--model_dir', os.path.join(zip_model, 'model'),
        '--reference', f'statezip=topic:{reference}',
        '--group_id', f'zips-{uuid.uuid4().hex[:6]}'])
    predictions = TopicReader(kafka_bootstrap, topics['predictions'])
    dead = TopicReader(kafka_bootstrap, topics['dlq'])
    try:
      replay.replay(HOUSES_ZIP, known + unknown, topics['events'],
                    kafka_bootstrap)
      predictions.until(len(known), 240)
      dead.until(len(unknown), 60)
      # While the job runs: one zip's figures change, another zip goes.
      new_price = float(rows[zip_changed]['zip_median_price']) * 3
      produce(kafka_bootstrap, reference, [
          (zip_changed.encode(), json.dumps({'zip_median_price': new_price,
                                             'zip_count': 1}).encode()),
          (zip_deleted.encode(), None)])
      version = f'{reference}@{len(rows) + 1}'
      # Events until the job has applied both (predictions say which
      # version they used), then the rest.
      sent = []
      for event in changed:
        replay.replay(HOUSES_ZIP, [event], topics['events'], kafka_bootstrap)
        sent.append(event)
        items = predictions.until(len(known) + len(sent), 60)
        if any(p.get('references', {}).get('statezip') == version
               for p in items):
          break
      rest = changed[len(sent):]
      replay.replay(HOUSES_ZIP, rest, topics['events'], kafka_bootstrap)
      sent += rest
      predictions.until(len(known) + len(sent), 120)
      gone = [(f'{e}-d', dict(v, statezip=zip_deleted))
              for e, v in events[63:66]]
      replay.replay(HOUSES_ZIP, gone, topics['events'], kafka_bootstrap)
      dead.until(len(unknown) + len(gone), 60)
      predictions.until(len(known) + len(sent), 10)
    finally:
      result.cancel()
      predictions.close()
      dead.close()
  by_id = {p['event_id']: p for p in predictions.items}
  first = {p['references']['statezip'] for e, _ in known
           for p in [by_id[e]]}
  assert first == {f'{reference}@{len(rows) - 1}'}
  letters = {d['key']: d for d in dead.items}
  assert set(letters) == {e for e, _ in unknown + gone}
  assert all('no statezip reference' in d['errors'][0]['reason']
             and d['stage'] == 'Enrich' for d in letters.values())
  # The events scored after the update saw the new figures: their
  # predictions equal the model called on the newly enriched record.
  model = serving.load(os.path.join(zip_model, 'model', '1'))
  after = [(e, v) for e, v in sent
           if by_id[e]['references']['statezip'] == version]
  assert after
  for event_id, event in after:
    record = R.parse_json(HOUSES_ZIP, event)
    new = enrichment.enrich(HOUSES_ZIP, record, {'statezip': enrichment.Snapshot(
        {zip_changed: {'zip_median_price': new_price, 'zip_count': 1.0}}, version)})
    assert by_id[event_id]['prediction'] == pytest.approx(serving.predict(
        HOUSES_ZIP, model, [new])['prediction'][0], rel=1e-5)


def test_the_split_ignores_the_joined_fields():
  """houses and houses_zip put every row in the same split, so the
  reference table (built from houses' training split) holds no eval
  label."""
  from problems.houses import PROBLEM as HOUSES
  rows = list(R.read_csv(HOUSES, 'data/houses.csv'))[:200]
  assert [R.record_key(HOUSES, r) for r in rows] == [
      R.record_key(HOUSES_ZIP, r) for r in rows]
