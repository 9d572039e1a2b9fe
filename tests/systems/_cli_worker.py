"""Run ``chatumm`` commands in this process, one after another, as one rank of a multi-process job.

Usage: ``python _cli_worker.py RUNS.json`` with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set (``run_ranks``), so
Lightning joins the given ranks instead of launching processes. ``RUNS.json`` is a list of argv lists for
:func:`chatumm_kit.cli.main`; every rank runs all of them in order (each must return 0). Several runs share one
pair of processes because importing Lightning is most of the cost of a tiny run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from chatumm_kit.cli import main as chatumm


def main() -> None:
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        rc = chatumm(argv)
        if rc != 0:
            raise SystemExit(f"chatumm {' '.join(argv)} exited {rc}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # interpreter teardown after a Lightning run is slow; everything is written and flushed
