"""``scripts/gpu_check.py`` (the GPU check) on this CPU machine: its CPU-side checks (the C++ CPU
remap kernel against the script's pure-torch reference) pass, with TorchRec and fbgemm-gpu made
unimportable, and the GPU part is reported as skipped. Also: the reference itself agrees with
the op on a case the script builds, and catches a wrong value (so the checks can fail)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from torchrec_cce import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")

# Run the script as __main__ with torchrec / fbgemm_gpu blocked (``import torchrec`` raises).
_BLOCKED = ("import runpy, sys; sys.modules['torchrec'] = None; "
            "sys.modules['fbgemm_gpu'] = None; sys.argv = [{script!r}] + sys.argv[1:]; "
            "runpy.run_path({script!r}, run_name='__main__')")

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason="the fused op cannot be built")


def test_cpu_side_runs_without_torchrec():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", _BLOCKED.format(script=SCRIPT), "--seeds", "2",
                          "--timing-batch", "256", "--repeats", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("gpu_check: PASS"), summary
    assert "no CUDA: GPU part skipped" in summary
    # 2 seeds x (every case + the weight gradient), none failed, none imported torchrec.
    n_cases = 17
    assert f"cpu {2 * (n_cases + 1)}" in summary and ", 0 failed" in summary, summary
    assert "FAIL" not in out.stderr, out.stderr


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_detects_a_wrong_value():
    gc = _script()
    cases = gc.make_cases(seed=7)
    assert len(cases) == 17
    case = next(c for c in cases if c.name == "cce_qr_init")
    got = ops.remap(*case.args("cpu"))
    want = gc._ref(case, "cpu")
    gc._same(case.name, got, want)
    assert got[0].numel() > 0
    broken = (got[0].clone(), got[1], got[2])
    broken[0][-1] += 1
    with pytest.raises(AssertionError, match="values differ"):
        gc._same(case.name, broken, want)
    # A packed assignment's value changed behind the op's back: the reference disagrees.
    case = next(c for c in cases if c.name == "cce_packed_10bit")
    values = ops.remap(*case.args("cpu"))[0]
    case.assignment_values[0] = (case.assignment_values[0] + 1) % 1000
    with pytest.raises(AssertionError):
        gc._same(case.name, (values, *ops.remap(*case.args("cpu"))[1:]), gc._ref(case, "cpu"))
    assert torch.equal(values, ops.remap(*case.args("cpu"))[0])
