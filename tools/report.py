"""A PNG report of an analytics run: events per window, drift per feature.

Reads the JSON lines files that ``pipelines.analytics --output_path DIR``
wrote (``stats``, ``late``, and with ``--training_stats`` also ``drift`` and
``alerts``) and draws:

1. events per window over event time: all keys and the busiest keys, from
   each window's final pane, with late records marked;
2. numeric drift: each feature's window mean shift in training-std units,
   the alert threshold band and the alerts raised;
3. categorical drift: share of values unseen in training, and missing-rate
   increase, per feature.

Run::

    python -m tools.report [--problem taxi] --input out/analytics \\
        --output out/analytics/report.png
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
from typing import Any, Iterable, Optional

from transforms import problem as problem_lib
from transforms import stats as S
from transforms.monitoring import DriftThresholds
from transforms.problem import Kind, Problem


def load_rows(directory: str, name: str) -> list[dict[str, Any]]:
  """All rows of ``DIR/name-*.jsonl`` (an absent output is empty)."""
  rows = []
  for path in sorted(glob.glob(os.path.join(directory, f'{name}-*.jsonl'))):
    with open(path, encoding='utf-8') as f:
      rows.extend(json.loads(line) for line in f if line.strip())
  return rows


def window_totals(stats_rows: Iterable[dict[str, Any]]
                  ) -> dict[tuple[Any, float], dict[str, Any]]:
  """(key, window start) -> the window's total over its panes.

  Accumulating panes: the last pane holds the total. Discarding panes: each
  pane holds what arrived since the previous one, so counts add up.
  """
  totals: dict[tuple[Any, float], dict[str, Any]] = {}
  for row in stats_rows:
    slot = (row['key'], row['window_start_s'])
    seen = totals.get(slot)
    if row.get('accumulation') == 'discarding':
      if seen is None:
        totals[slot] = dict(row)
      else:
        seen['count'] += row['count']
    elif seen is None or row['pane_index'] > seen['pane_index']:
      totals[slot] = row
  return totals


def newest_panes(rows: Iterable[dict[str, Any]], *fields: str
                 ) -> dict[tuple, dict[str, Any]]:
  """(fields..., window start) -> the row of the window's newest pane (the
  most complete one, with accumulating panes)."""
  out: dict[tuple, dict[str, Any]] = {}
  for row in rows:
    if 'window_start_s' not in row:
      continue
    slot = tuple(row.get(f) for f in fields) + (row['window_start_s'],)
    if slot not in out or row.get('pane_index', 0) >= out[slot].get(
        'pane_index', 0):
      out[slot] = row
  return out


def utc_time(seconds: float) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def draw(problem: Problem, directory: str, output: str, top_keys: int = 5,
         thresholds: Optional[DriftThresholds] = None) -> str:
  """Writes the PNG report of the run in ``directory``; returns its path."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  thresholds = thresholds or DriftThresholds()
  stats_rows = load_rows(directory, 'stats')
  late_rows = load_rows(directory, 'late')
  drift = newest_panes(load_rows(directory, 'drift'), 'feature')
  alerts = load_rows(directory, 'alerts')
  panels = 1 + bool(drift) * 2
  fig, axes = plt.subplots(panels, 1, figsize=(12, 3.6 * panels),
                           sharex=True, squeeze=False)
  axes = axes[:, 0]

  # 1. Events per window.
  totals = window_totals(stats_rows)
  per_window = collections.Counter()
  per_key = collections.defaultdict(dict)
  for (key, start), row in totals.items():
    per_window[start] += row['count']
    per_key[key][start] = row['count']
  ax = axes[0]
  starts = sorted(per_window)
  key_name = stats_rows[0]['key_name'] if stats_rows else 'key'
  ax.plot([utc_time(s) for s in starts], [per_window[s] for s in starts],
          color='black', lw=1.5, label='all keys')
  busiest = sorted(per_key, key=lambda k: -sum(per_key[k].values()))
  for key in busiest[:top_keys]:
    points = sorted(per_key[key].items())
    ax.plot([utc_time(s) for s, _ in points], [c for _, c in points], lw=0.9,
            alpha=0.8, label=f'{key_name}={key}')
  late_per_window = collections.Counter(
      r['window_start_s'] for r in late_rows)
  if late_per_window:
    xs = sorted(late_per_window)
    ax.scatter([utc_time(s) for s in xs], [late_per_window[s] for s in xs],
               marker='v', color='red', zorder=3,
               label=f'too late ({len(late_rows)} records)')
  span = (starts[1] - starts[0]) if len(starts) > 1 else 0
  ax.set_title(f'Events per window (final panes; {len(totals)} key-windows, '
               f'{sum(per_window.values())} events, {len(late_rows)} too '
               f'late){f", window step {span / 3600:g} h" if span else ""}')
  ax.set_ylabel('events')
  ax.legend(loc='upper left', fontsize=8, ncol=2)
  ax.grid(alpha=0.3)

  if drift:
    # 2. Numeric features: mean shift in training std units.
    ax = axes[1]
    numeric = [f.name for f in problem.model_features
               if S.has_numeric_stats(f) and f.kind is not Kind.IDENTITY]
    for name in numeric:
      points = sorted((s, r['mean_shift']) for (n, s), r in drift.items()
                      if n == name and r.get('mean_shift') is not None)
      if points:
        ax.plot([utc_time(s) for s, _ in points], [v for _, v in points],
                lw=1, label=name)
    ax.axhspan(-thresholds.mean_shift, thresholds.mean_shift, color='green',
               alpha=0.08, label=f'±{thresholds.mean_shift:g} std: no alert')
    shift_alerts = [a for a in alerts if a['metric'] == 'mean_shift']
    if shift_alerts:
      ax.scatter([utc_time(a['window_start_s']) for a in shift_alerts],
                 [a['value'] for a in shift_alerts], marker='x', color='red',
                 zorder=3, label=f'alerts ({len(shift_alerts)})')
    ax.set_title('Numeric drift: window mean minus training mean, in '
                 'training std units')
    ax.set_ylabel('mean shift (std)')
    ax.legend(loc='upper left', fontsize=8, ncol=3)
    ax.grid(alpha=0.3)

    # 3. Categorical features: unseen share and missing-rate increase.
    ax = axes[2]
    categorical = [f.name for f in problem.model_features
                   if S.has_vocabulary(f)]
    for name in categorical:
      points = sorted((s, r['unseen_share']) for (n, s), r in drift.items()
                      if n == name and r.get('unseen_share') is not None)
      if points and any(v for _, v in points):
        ax.plot([utc_time(s) for s, _ in points], [v for _, v in points], lw=1,
                label=f'{name}: unseen')
    for name in categorical:
      points = sorted(
          (s, r['missing_rate'] - r['train_missing_rate'])
          for (n, s), r in drift.items()
          if n == name and r.get('missing_rate') is not None)
      if points and max(abs(v) for _, v in points) > 0.05:
        ax.plot([utc_time(s) for s, _ in points], [v for _, v in points],
                lw=1, ls='--', label=f'{name}: missing-rate increase')
    ax.axhline(thresholds.unseen, color='red', lw=0.8, ls=':',
               label=f'unseen threshold {thresholds.unseen:g}')
    unseen_alerts = [a for a in alerts if a['metric'] == 'unseen_share']
    if unseen_alerts:
      ax.scatter([utc_time(a['window_start_s']) for a in unseen_alerts],
                 [a['value'] for a in unseen_alerts], marker='x',
                 color='red', zorder=3,
                 label=f'unseen alerts ({len(unseen_alerts)})')
    ax.set_title('Categorical drift: share of values unseen in training, '
                 'missing-rate change')
    ax.set_ylabel('share')
    ax.legend(loc='upper left', fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
  axes[-1].set_xlabel('event time (window start, UTC)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


def main(argv: Optional[list[str]] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT,
                      help='The problem the analytics ran on.')
  parser.add_argument('--input', required=True,
                      help='The --output_path of a pipelines.analytics run.')
  parser.add_argument('--output', required=True, help='PNG file to write.')
  parser.add_argument('--top_keys', type=int, default=5)
  parser.add_argument('--mean_shift_threshold', type=float,
                      default=DriftThresholds().mean_shift)
  parser.add_argument('--unseen_threshold', type=float,
                      default=DriftThresholds().unseen)
  args = parser.parse_args(argv)
  path = draw(problem_lib.load(args.problem), args.input, args.output,
              args.top_keys, DriftThresholds(
      mean_shift=args.mean_shift_threshold, unseen=args.unseen_threshold))
  print(f'[report] wrote {path}')
  return path


if __name__ == '__main__':
  main()
