"""bench.peer end to end on the demo model, without the peer's venv: vlgate's stack against model.generate."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from devtools.live import ROOT


@pytest.mark.soak  # a whole deployment plus an in-process model, ~35 s on 2 cores: run by `make faults`
def test_vlgate_and_in_process_rows_have_throughput_and_the_same_greedy_answer(data_dir):
    argv = [sys.executable, "-m", "bench.peer", "--systems", "vlgate,inprocess", "--concurrency", "1", "--rounds", "1",
            "--tokens", "8", "--data-dir", str(data_dir)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    rows = {name: re.search(rf"^{re.escape(name)}\s+([\d.]+)\s", out, re.M)
            for name in ("vlgate", "in process, model.generate one at a time")}
    assert all(rows.values()), out
    assert all(float(m.group(1)) > 0 for m in rows.values()), out
    assert "in process, model.generate one at a time: 1/1 prompts identical" in out, out
    assert "project .venv: torch" in out and "transformers serve" not in out  # no peer column was asked for
