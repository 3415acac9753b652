"""Execute notebooks in place with nbclient, so that their stored outputs come from a full run.

Usage, from the repository root::

    nice -n 10 python notebooks/execute.py notebooks/01_quickstart.ipynb [more.ipynb ...]

Each notebook runs in the ``python3`` kernel with its own folder as the working directory, as
Jupyter runs it, and is written back only when every cell succeeded. Outputs of the smoke mode
are never stored: with ``BAYESHEAD_NOTEBOOK_SMOKE`` set, this script exits with an error
(CI executes the notebooks in smoke mode through ``tests/test_notebooks.py`` instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

# Longest time, in seconds, that one cell may run. The longest full-mode cells train two CNNs.
DEFAULT_CELL_TIMEOUT_S = 3600


def execute_in_place(path: Path, timeout: int) -> float:
    """Run every cell of the notebook at ``path``, write the outputs back, and return the wall time."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(notebook, path)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK", help="notebook files to execute")
    parser.add_argument("--timeout", type=int, default=DEFAULT_CELL_TIMEOUT_S,
                        help=f"seconds one cell may run (default {DEFAULT_CELL_TIMEOUT_S})")
    args = parser.parse_args(argv)
    if os.environ.get("BAYESHEAD_NOTEBOOK_SMOKE", "").strip():
        print("execute.py: error: BAYESHEAD_NOTEBOOK_SMOKE is set, and smoke-mode outputs are not "
              "stored in the notebooks; unset it to run the full settings", file=sys.stderr)
        return 2
    status = 0
    for path in args.notebooks:
        try:
            seconds = execute_in_place(path.resolve(), args.timeout)
        except CellExecutionError as error:
            print(f"execute.py: error: {path} failed and was not written back:\n{error}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: executed and written back in {seconds:.0f} s wall time")
    return status


if __name__ == "__main__":
    sys.exit(main())
