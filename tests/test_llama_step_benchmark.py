"""benchmarks/llama_step.py at its tiny config: it runs end to end, its four contenders (npformer,
transformers eager and sdpa, the plain-torch twin) compute the same loss on the same weights and take
the same training step, and it refuses to time when the losses differ. Its timings are not checked.

The script runs in fresh interpreters (it sets torch's thread count and forks npformer's workers);
only check_losses is called here. Skipped without torch and transformers.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import DEVICE

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.verify,
              pytest.mark.skipif(DEVICE != "cpu", reason="a CPU benchmark: run once, in the CPU suite")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "llama_step.py")
FRAMEWORKS = ("npformer", "hf-eager", "hf-sdpa", "torch")
TINY_VOCAB = 128


def _python(args, timeout=300):
    """stdout of `python args` run from the benchmarks folder, with the repository importable."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NPFORMER_DEVICE", None)
    out = subprocess.run([sys.executable, *args], cwd=os.path.dirname(SCRIPT), capture_output=True, text=True,
                         timeout=timeout, env=env, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def llama_step():
    spec = importlib.util.spec_from_file_location("llama_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_runs_and_its_contenders_agree_at_step_0_and_after_two_steps(tmp_path, threads=2):
    """One fresh interpreter (importing torch and transformers takes seconds) runs the script's main at
    one round, then builds the contenders again and takes two steps of each, then the loss again:
    equal to float32 rounding, and lower than at step 0 (a twin with other AdamW settings, or
    npformer's workers weighting the shards wrongly, would differ). Two workers only: one worker is
    the same step without the split, and the suite's time is short."""
    out = tmp_path / "llama.json"
    argv = [SCRIPT, "--config", "tiny", "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--no-memory", "--json", str(out)]
    code = ("import json, sys, llama_step as b;"
            f"sys.argv = {argv!r}; b.main();"
            f"steps = b.build('tiny', {threads});"
            "[f() for f in steps.values() for _ in range(2)];"
            "print(json.dumps([b.build.losses, {k: f() for k, f in b.build.loss_now.items()}]))")
    stdout = _python(["-c", code])
    assert "step-0 loss:" in stdout
    rows = json.loads(out.read_text())
    assert [r["framework"] for r in rows] == list(FRAMEWORKS)
    ref = rows[0]["step0_loss"]
    # random weights of std 0.02 give nearly uniform predictions: the mean cross-entropy is about ln V
    assert abs(ref - math.log(TINY_VOCAB)) < 0.05, ref
    for r in rows:
        assert abs(r["step0_loss"] - ref) <= 1e-5 * ref, (r["framework"], r["step0_loss"], ref)
        assert r["ms_per_step"] > 0 and len(r["rounds_ms"]) == 1
        assert r["ratio_npformer_over"] == pytest.approx(rows[0]["ms_per_step"] / r["ms_per_step"], rel=0.05)

    before, after = json.loads(stdout.strip().splitlines()[-1])
    assert list(after) == list(FRAMEWORKS)
    for k in FRAMEWORKS:
        assert after[k] < before[k] - 1e-3, (k, before[k], after[k])
        assert abs(after[k] - after["npformer"]) <= 2e-6 * after["npformer"], (k, after[k], after["npformer"])


def test_peak_memory_runs_in_a_fresh_interpreter(llama_step):
    mb = llama_step.peak_memory_mb("tiny", "npformer", 2)         # npformer's forked worker counts too
    assert 0 < mb < 1000, mb


def test_losses_that_differ_refuse_to_time(llama_step, capsys):
    assert llama_step.check_losses({"npformer": 4.0, "torch": 4.0 * (1 + 5e-6)}) == pytest.approx(5e-6)
    with pytest.raises(SystemExit, match="not meaningful"):
        llama_step.check_losses({"npformer": 4.0, "hf-eager": 4.0, "torch": 4.0 * (1 + 2e-5)})
    with pytest.raises(SystemExit, match="not meaningful"):
        llama_step.check_losses({"npformer": 4.0, "hf-sdpa": float("nan")})
    assert "step-0 loss: npformer 4.0000000" in capsys.readouterr().out
