"""``python -m pipeline.demo``: the earlier name of ``foldseg run`` (``pipeline.workflow``),
kept so that existing scripts keep working."""

from __future__ import annotations

from pipeline.run.process import exit_process
from pipeline.workflow import main

if __name__ == "__main__":
    exit_process(main(prog="python -m pipeline.demo"))
