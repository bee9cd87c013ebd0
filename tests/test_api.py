"""The README's Python API example, run as written: a study with a callback of the user's own,
handing back the trials table, the Optuna study and Tune's ResultGrid."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO


def _readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"one README block with {marker!r}, found {len(found)}"
    return found[0]


@pytest.mark.slow
def test_the_readme_python_api_example_runs_as_written(tmp_path):
    code = _readme_block("study.run(spec, callbacks=")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    seen, carried, epochs = map(int, re.search(r"callback saw (\d+) results carrying (\d+) epochs; (\d+) epochs trained",
                                               out).groups())
    assert 0 < seen <= carried == epochs  # the user's callback ran beside the study's own, and saw every epoch
    assert re.search(r"Optuna: 4 trials, best \{'latent_dim': \d+, 'beta': [\d.e-]+, 'lr': [\d.e-]+\}", out), out
    trial_ids = set(re.findall(r"\b([0-9a-f]{8})\b", out.split("callback saw")[0]))
    best = re.search(r"Tune's best: ([0-9a-f]{8}) ([\d.]+)", out)
    assert best and best.group(1) in trial_ids, out
    logged = int(re.search(r"(\d+) epochs in its result.json", out).group(1))
    row = next(r for r in map(str.split, out.splitlines())
               if r[1:3] in ([best.group(1), "completed"], [best.group(1), "pruned"]))
    assert logged == int(row[-2])  # its epochs_run: the trial's DataFrame, read from Tune's result.json
    assert (tmp_path / "studies" / "api-demo" / "study.json").is_file()
