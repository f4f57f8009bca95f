"""The import contracts of ``.importlinter`` hold: the layers (tools >
pipelines > models > transforms), runners that only launch, the problem as a
value, a Kafka connector that stands alone. Reads the source, runs nothing
(under a second)."""

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
# `lint-imports` of this interpreter's environment (importlinter has no
# __main__); --no-cache leaves no .import_linter_cache in the repo.
LINT_IMPORTS = [sys.executable, '-c',
                'from importlinter.cli import lint_imports_command as run; '
                'run()', '--no-cache', '--no-logo']


def test_import_contracts_hold():
  result = subprocess.run(LINT_IMPORTS, cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, f'lint-imports failed:\n{output}'
  kept = re.search(r'Contracts: (\d+) kept, 0 broken', output)
  assert kept and int(kept.group(1)) >= 4, output
