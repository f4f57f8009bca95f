"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and its
model learned something: it declares a problem, validates rows, runs
tf.Transform, trains, serves and plots (about a minute)."""

import math
import os
import pathlib
import re

import pytest

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'
# The eval MAPE of always predicting the median training price is 0.49.
CONSTANT_BASELINE_MAPE = 0.49


def _kernel_for_this_python(prefix: pathlib.Path, monkeypatch) -> str:
  """A kernelspec running this interpreter (the venv), private to the test.

  The name 'python3' may resolve to a user-level kernelspec of another
  Python, without the project installed; this one cannot.
  """
  from ipykernel import kernelspec
  name = 'rtml-test'
  kernelspec.install(kernel_name=name, prefix=str(prefix))
  monkeypatch.setenv('JUPYTER_PATH', os.pathsep.join(
      [str(prefix / 'share' / 'jupyter')]
      + [p for p in os.environ.get('JUPYTER_PATH', '').split(os.pathsep) if p]))
  return name


def _check_beam_dataframe():
  """Under IPython, Beam imports its DataFrame API whenever a pipeline is
  built (interactive labels); a pandas it does not support fails there."""
  try:
    import apache_beam.dataframe.frames  # pylint: disable=unused-import
  except Exception as e:  # pylint: disable=broad-except
    import apache_beam
    import pandas
    pytest.fail(f'apache_beam.dataframe does not import ({e!r}): Beam '
                f'{apache_beam.__version__} does not support pandas '
                f'{pandas.__version__}, so no Beam pipeline can be built in '
                'a notebook; pin a pandas Beam supports in setup.py')


def _text(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.get('outputs', [])
                 if o.get('output_type') == 'stream' and o['name'] == 'stdout')


def _number(pattern: str, text: str) -> float:
  found = re.search(pattern, text)
  assert found, f'{pattern!r} not in the output:\n{text}'
  return float(found.group(1))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  import nbclient
  import nbformat

  _check_beam_dataframe()
  out = tmp_path / 'out'
  monkeypatch.setenv('RTML_QUICKSTART_OUT', str(out))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  kernel = _kernel_for_this_python(tmp_path / 'kernel', monkeypatch)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), (
      'commit the notebook with its outputs cleared')
  # Raises CellExecutionError, with the cell and its traceback, if a cell
  # fails.
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name=kernel,
      resources={'metadata': {'path': str(REPO)}}).execute()

  code = [c for c in nb.cells if c.cell_type == 'code']
  text = '\n'.join(_text(c) for c in code)
  # Parsing: the 49 sales at price 0 are rejected, with the reason.
  assert re.search(r'\b49 invalid\b', text), text
  assert "'field': 'price'" in text and 'out of domain' in text, text
  # Training: a finite eval MAPE that beats predicting a constant price.
  mape = _number(r'eval MAPE: (\S+)', text)
  assert math.isfinite(mape) and 0 < mape < CONSTANT_BASELINE_MAPE - 0.04
  held_out = _number(r'held-out rows: MAPE (\S+)', text)
  assert math.isfinite(held_out) and 0 < held_out < 1
  metrics = (out / 'train' / 'metrics.json').read_text()
  assert math.isclose(_number(r'"mape": (\S+),', metrics), mape, abs_tol=5e-4)
  # The plot: shown in the last code cell, and saved as a PNG.
  assert any('image/png' in o.get('data', {}) for o in code[-1].outputs)
  png = out / 'predicted_vs_actual.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert png.stat().st_size > 10_000
