"""A dataclass of settings (alert thresholds...) as pipeline flags.

    add_flags(parser, monitoring.DriftThresholds, prefix='drift_')
    thresholds = from_flags(monitoring.DriftThresholds, opts, prefix='drift_')
"""

from __future__ import annotations

import dataclasses
from typing import Any


def add_flags(parser, cls, prefix: str = '', what: str = 'Alert threshold'
              ) -> None:
  """One ``--<prefix><field>`` flag per field of dataclass ``cls``, typed
  int or float, with the field's default."""
  for field in dataclasses.fields(cls):
    parser.add_argument(f'--{prefix}{field.name}',
                        type=int if field.type in (int, 'int') else float,
                        default=field.default, help=f'{what}: {field.name}.')


def from_flags(cls, opts: Any, prefix: str = ''):
  """The ``cls`` instance the flags of ``add_flags`` describe."""
  return cls(**{f.name: getattr(opts, f'{prefix}{f.name}')
                for f in dataclasses.fields(cls)})
