"""A live report of a serving stream: quality and drift over time per model.

Reads, from the broker, what the streaming jobs write:

* ``<problem>-quality`` (``pipelines.quality``): live quality per model and
  window from the labels joined to predictions;
* ``<problem>-metrics`` (``pipelines.serve --training_stats``): prediction
  distribution, feature drift and dead letters per model and window;
* ``<problem>-alerts``: the alerts of both;

and draws one PNG (and an HTML page around it, with the latest figures per
model and the recent alerts) of:

1. live quality per model (binary AUC, multi-class accuracy, regression
   MAPE) over event time, each model's training figure (its eval split, from
   the model's ``model_info.json``) drawn as a dashed line, quality alerts;
2. the prediction distribution per model (binary: mean probability and
   predicted positive rate; multi-class: share of each class; regression:
   mean prediction) and dead letters per window;
3. drift: each feature's mean shift (training std units) and unseen-category
   share, with the alerts raised.

Each window counts by its newest pane. With ``--refresh_s N`` it keeps
reading the topics and rewrites both files every N seconds (the HTML page
reloads itself); without, it reads what is there and stops::

    python -m tools.live_report --problem taxi \\
        --bootstrap_servers 127.0.0.1:9092 --model_dir out/train/model \\
        --output out/live/report.png [--refresh_s 10]
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import html
import json
import os
import sys
import time
from typing import Any, Iterable, Optional

from models.metrics import HEADLINE
from tools.report import newest_panes, utc_time
from transforms import problem as problem_lib
from transforms.problem import Problem, Task


# ------------------------------------------------------------------ reading

class TopicsTail:
  """Every JSON record of some topics, from the beginning, read on demand."""

  def __init__(self, bootstrap: str, topics: Iterable[str]):
    from kafka import KafkaConsumer
    self._consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False,
        auto_offset_reset='earliest', consumer_timeout_ms=500)
    self._topics = list(topics)
    self._assigned: set = set()
    self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in self._topics}
    self.skipped = 0

  def _assign(self) -> None:
    from kafka import TopicPartition
    partitions = set()
    for topic in self._topics:
      for p in self._consumer.partitions_for_topic(topic) or ():
        partitions.add(TopicPartition(topic, p))
    if partitions - self._assigned:
      self._consumer.assign(sorted(partitions))
      for tp in partitions - self._assigned:
        self._consumer.seek_to_beginning(tp)
      self._assigned = partitions

  def read(self) -> int:
    """Reads what arrived since the last call; returns how many records."""
    self._assign()
    if not self._assigned:
      return 0
    count = 0
    while True:
      batches = self._consumer.poll(timeout_ms=500)
      if not batches:
        return count
      for tp, messages in batches.items():
        for message in messages:
          try:
            row = json.loads(message.value)
          except (TypeError, ValueError):
            self.skipped += 1
            continue
          if isinstance(row, dict):
            self.rows[tp.topic].append(row)
            count += 1

  def close(self) -> None:
    self._consumer.close()


def training_figures(model_dir: Optional[str], problem: Problem
                     ) -> dict[str, float]:
  """``name@version`` -> the headline metric on the training eval split."""
  headline, _ = HEADLINE[problem.task]
  out = {}
  if not model_dir or not os.path.isdir(model_dir):
    return out
  for version in os.listdir(model_dir):
    path = os.path.join(model_dir, version, 'assets.extra', 'model_info.json')
    if version.isdigit() and os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        info = json.load(f)
      value = (info.get('eval') or {}).get(headline)
      if value is not None:
        out[f'{problem.name}@{int(version)}'] = float(value)
  return out


# ------------------------------------------------------------------ drawing

def _series(rows: dict[tuple, dict[str, Any]], field: str, **match):
  points = sorted(
      (slot[-1], row[field]) for slot, row in rows.items()
      if row.get(field) is not None
      and all(row.get(k) == v for k, v in match.items()))
  return [utc_time(s) for s, _ in points], [v for _, v in points]


def summarize(problem: Problem, tail: TopicsTail, topics: dict[str, str],
              baselines: dict[str, float]) -> dict[str, Any]:
  """The figures the report draws, from the rows read so far."""
  headline, _ = HEADLINE[problem.task]
  quality = newest_panes(
      (r for r in tail.rows[topics['quality']] if r.get('type') == 'quality'),
      'model_key')
  metrics = tail.rows[topics['metrics']]
  predictions = newest_panes(
      (r for r in metrics if r.get('type') == 'predictions'), 'model_key')
  drift = newest_panes((r for r in metrics if r.get('type') == 'drift'),
                       'model_key', 'feature')
  dead = newest_panes(
      (r for r in metrics if r.get('type') == 'dead_letters'), 'stage')
  alerts = [a for a in tail.rows[topics['alerts']]
            if a.get('type', 'alert') == 'alert']
  latest = {}
  for (model, start), row in sorted(quality.items(), key=lambda kv: kv[0][1]):
    latest[model] = {'window_start': row.get('window_start'),
                     'labelled': row.get('labelled'),
                     headline: row.get(headline),
                     'training': baselines.get(model)}
  return {'headline': headline, 'quality': quality,
          'predictions': predictions, 'drift': drift, 'dead': dead,
          'alerts': alerts, 'latest': latest}


def draw(problem: Problem, summary: dict[str, Any], baselines: dict[str, float],
         output: str) -> str:
  """Writes the PNG; returns its path."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  headline = summary['headline']
  fig, axes = plt.subplots(3, 1, figsize=(12, 11), sharex=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']

  # 1. Live quality per model, training figure dashed.
  ax = axes[0]
  quality = summary['quality']
  models = sorted({slot[0] for slot in quality}
                  | {slot[0] for slot in summary['predictions']})
  for i, model in enumerate(models):
    color = colors[i % len(colors)]
    xs, ys = _series(quality, headline, model_key=model)
    if xs:
      ax.plot(xs, ys, marker='o', ms=3, lw=1.2, color=color,
              label=f'{model} live')
    if model in baselines:
      ax.axhline(baselines[model], color=color, ls='--', lw=1,
                 label=f'{model} training eval {baselines[model]:.3f}')
  quality_alerts = [a for a in summary['alerts']
                    if a.get('kind') == 'quality' and a.get('metric') == headline
                    and 'window_start_s' in a]
  if quality_alerts:
    ax.scatter([utc_time(a['window_start_s']) for a in quality_alerts],
               [a['value'] for a in quality_alerts], marker='x', color='red',
               zorder=3, label=f'alerts ({len(quality_alerts)})')
  labelled = sum(r.get('labelled') or 0 for r in quality.values())
  ax.set_title(f'Live {headline} per model and window ({len(quality)} '
               f'windows, {labelled} labelled events)')
  ax.set_ylabel(headline)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc='lower left', fontsize=8, ncol=2)

  # 2. Prediction distribution per model; dead letters per window.
  ax = axes[1]
  predictions = summary['predictions']
  for i, model in enumerate(sorted({slot[0] for slot in predictions})):
    color = colors[i % len(colors)]
    if problem.task is Task.BINARY:
      xs, ys = _series(predictions, 'mean_probability', model_key=model)
      ax.plot(xs, ys, lw=1.2, color=color, label=f'{model} mean probability')
      xs, ys = _series(predictions, 'predicted_positive_rate',
                       model_key=model)
      ax.plot(xs, ys, lw=1, ls=':', color=color,
              label=f'{model} predicted positive rate')
    elif problem.task is Task.MULTICLASS:
      rows = {k: r for k, r in predictions.items() if k[0] == model}
      for j, name in enumerate(problem.label.classes):
        points = sorted((k[-1], (r.get('predicted_class_shares') or {}).get(
            name)) for k, r in rows.items())
        points = [(s, v) for s, v in points if v is not None]
        ax.plot([utc_time(s) for s, _ in points], [v for _, v in points],
                lw=1, color=colors[(i + j) % len(colors)],
                label=f'{model} {name}')
    else:
      xs, ys = _series(predictions, 'mean_prediction', model_key=model)
      ax.plot(xs, ys, lw=1.2, color=color, label=f'{model} mean prediction')
  dead = collections.Counter()
  size_s = 0.0
  for (stage, start), row in summary['dead'].items():
    dead[start] += row.get('count') or 0
    size_s = row['window_end_s'] - row['window_start_s']
  if dead:
    twin = ax.twinx()
    starts = sorted(dead)
    width = size_s / 86400 * 0.8   # matplotlib dates: days
    twin.bar([utc_time(s) for s in starts], [dead[s] for s in starts],
             width=width, align='edge', color='grey', alpha=0.3,
             label=f'dead letters ({sum(dead.values())})')
    twin.set_ylabel('dead letters per window')
    twin.legend(loc='upper right', fontsize=8)
  ax.set_title('Predictions per model and window (serving monitor)')
  ax.set_ylabel('share' if problem.task is not Task.REGRESSION
                else problem.label.name)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc='upper left', fontsize=8, ncol=2)

  # 3. Drift per feature; alerts.
  ax = axes[2]
  drift = summary['drift']
  for feature in sorted({slot[1] for slot in drift}):
    rows = {k: r for k, r in drift.items() if k[1] == feature}
    xs, ys = _series(rows, 'mean_shift')
    if xs and max(abs(v) for v in ys) > 0.25:
      ax.plot(xs, ys, lw=1, label=f'{feature}: mean shift (std)')
    xs, ys = _series(rows, 'unseen_share')
    if xs and max(ys) > 0.01:
      ax.plot(xs, ys, lw=1, ls='--', label=f'{feature}: unseen share')
  drift_alerts = [a for a in summary['alerts'] if a.get('kind') == 'drift'
                  and 'window_start_s' in a]
  if drift_alerts:
    ax.scatter([utc_time(a['window_start_s']) for a in drift_alerts],
               [a['value'] for a in drift_alerts], marker='x', color='red',
               zorder=3, label=f'drift alerts ({len(drift_alerts)})')
  ax.axhline(0, color='black', lw=0.5)
  ax.set_title('Feature drift against the training statistics (features '
               'that moved)')
  ax.set_ylabel('std units / share')
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc='upper left', fontsize=8, ncol=2)
  axes[-1].set_xlabel('event time (window start, UTC)')
  fig.suptitle(f'{problem.name}: live report, '
               f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  partial = output + '.partial.png'
  fig.savefig(partial, dpi=100)
  plt.close(fig)
  os.replace(partial, output)   # a reader never sees half a file
  return output


def write_html(problem: Problem, summary: dict[str, Any], png: str,
               refresh_s: float) -> str:
  """The page around the PNG: latest figures per model, recent alerts."""
  headline = summary['headline']
  with open(png, 'rb') as f:
    image = base64.b64encode(f.read()).decode('ascii')
  rows = ''.join(
      f'<tr><td>{html.escape(model)}</td><td>{html.escape(str(v["window_start"]))}'
      f'</td><td>{v["labelled"]}</td><td>{_fmt(v[headline])}</td>'
      f'<td>{_fmt(v["training"])}</td></tr>'
      for model, v in sorted(summary['latest'].items()))
  alerts = ''.join(
      f'<tr><td>{html.escape(str(a.get("window_start")))}</td>'
      f'<td>{html.escape(str(a.get("model_key")))}</td>'
      f'<td>{html.escape(str(a.get("kind")))}</td>'
      f'<td>{html.escape(str(a.get("feature") or ""))} '
      f'{html.escape(str(a.get("metric")))}</td><td>{_fmt(a.get("value"))}'
      f'</td><td>{_fmt(a.get("threshold"))}</td></tr>'
      for a in summary['alerts'][-20:])
  refresh = (f'<meta http-equiv="refresh" content="{refresh_s:g}">'
             if refresh_s else '')
  page = f'''<!doctype html><html><head><meta charset="utf-8">{refresh}
<title>{html.escape(problem.name)} live report</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 8px}}</style></head>
<body><h1>{html.escape(problem.name)}: live model quality and drift</h1>
<h2>Latest window per model</h2><table><tr><th>model</th><th>window</th>
<th>labelled</th><th>live {headline}</th><th>training {headline}</th></tr>
{rows}</table>
<h2>Recent alerts ({len(summary['alerts'])} in all)</h2><table><tr>
<th>window</th><th>model</th><th>kind</th><th>what</th><th>value</th>
<th>threshold</th></tr>{alerts}</table>
<img src="data:image/png;base64,{image}" style="max-width:100%"></body></html>
'''
  path = os.path.splitext(png)[0] + '.html'
  partial = path + '.partial'
  with open(partial, 'w', encoding='utf-8') as f:
    f.write(page)
  os.replace(partial, path)
  return path


def _fmt(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, (int, float)) else (
      '' if value is None else html.escape(str(value)))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT)
  parser.add_argument('--bootstrap_servers', default='127.0.0.1:9092')
  parser.add_argument('--quality_topic', default=None,
                      help='Default <problem>-quality.')
  parser.add_argument('--metrics_topic', default=None,
                      help='Default <problem>-metrics.')
  parser.add_argument('--alerts_topic', default=None,
                      help='Default <problem>-alerts.')
  parser.add_argument('--model_dir', default=None,
                      help='The served model root: its versions\' training '
                      'figures are drawn as baselines.')
  parser.add_argument('--output', required=True, help='PNG to write; the '
                      'HTML page goes beside it.')
  parser.add_argument('--refresh_s', type=float, default=0,
                      help='Keep reading and redraw every N seconds; 0: '
                      'draw once and stop.')
  parser.add_argument('--run_seconds', type=float, default=None,
                      help='With --refresh_s: stop after this long.')
  args = parser.parse_args(argv)
  problem = problem_lib.load(args.problem)
  topics = {'quality': args.quality_topic or problem.topic('quality'),
            'metrics': args.metrics_topic or problem.topic('metrics'),
            'alerts': args.alerts_topic or problem.topic('alerts')}
  tail = TopicsTail(args.bootstrap_servers, set(topics.values()))
  started = time.monotonic()
  try:
    while True:
      tail.read()
      baselines = training_figures(args.model_dir, problem)
      summary = summarize(problem, tail, topics, baselines)
      png = draw(problem, summary, baselines, args.output)
      page = write_html(problem, summary, png, args.refresh_s)
      counts = ', '.join(f'{len(tail.rows[t])} {name}'
                         for name, t in topics.items())
      print(f'[live_report] {counts} rows -> {png}, {page}', file=sys.stderr,
            flush=True)
      if not args.refresh_s or (
          args.run_seconds is not None
          and time.monotonic() - started >= args.run_seconds):
        return summary
      time.sleep(args.refresh_s)
  except KeyboardInterrupt:
    return summary
  finally:
    tail.close()


if __name__ == '__main__':
  main()
