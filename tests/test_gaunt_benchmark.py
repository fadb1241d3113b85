"""benchmarks/gaunt.py: its smoke run times every case, agrees with e3nn to the issue's
1e-4, and its summary says where FFT overtakes the grid as the rows say."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gaunt.py"


def test_quick_run_times_every_case_and_summarises_the_crossovers(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-model", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "gaunt_cpu.json").read_text())
    rows = {(r["lmax"], r["case"]): r for r in summary["rows"]}
    ours = ("ours dense", "ours grid", "ours fft")
    for lmax in (2, 4):  # with e3nn
        for case in (*ours, "fft calls only", "e3nn"):
            assert rows[lmax, case]["fwd_ms"] > 0 and rows[lmax, case]["fwd_bwd_ms"] > 0
        for case in ours:
            assert rows[lmax, case]["max_rel_diff"] < 1e-4
    for case in ("ours grid", "ours fft", "fft calls only"):  # backend sizes only
        assert rows[6, case]["fwd_ms"] > 0
    assert (6, "e3nn") not in rows and (6, "ours dense") not in rows

    def first_faster(case):
        faster = [
            lm for lm in (2, 4, 6) if rows[lm, case]["fwd_ms"] < rows[lm, "ours grid"]["fwd_ms"]
        ]
        return faster[0] if faster else None

    assert summary["fft_faster_from"] == first_faster("ours fft")
    assert summary["fft_calls_faster_from"] == first_faster("fft calls only")
    assert "fft calls only" in (tmp_path / "gaunt_cpu.md").read_text()
