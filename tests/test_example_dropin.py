"""The drop-in example (examples/l2l_style_before_after.py): every variant computes the plain loop's meta-gradient."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "l2l_style_before_after.py")


def _run(*args):
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sinusoid_variants_agree_with_the_plain_loop_in_float64():
    out = _run("--workload", "sinusoid", "--variants", "before,compat,batched", "--iters", "2", "--warmup", "1",
               "--rounds", "1", "--tasks", "5")
    assert "sinusoid MLP 1-40-40-1" in out and "T = 5, K = 1" in out
    # the float64 meta-gradients of the drop-in (compat) and batched calls equal the plain loop's
    assert "float64 meta-gradient equal to before's (max <= 1e-10): compat, batched; different: none" in out


def test_conv4_batched_variant_agrees_with_the_plain_loop():
    out = _run("--variants", "before,batched", "--filters", "8", "--tasks", "2", "--steps", "2", "--iters", "1",
               "--warmup", "0", "--rounds", "1")
    assert "Conv4-8 + BN" in out
    assert "float64 meta-gradient equal to before's (max <= 1e-10): batched; different: none" in out


def test_learn2learn_style_model_batched_variant_agrees_with_the_plain_loop():
    """learn2learn's OmniglotCNN layout (forwards of its own): the engine reads it by tracing."""
    out = _run("--workload", "l2l_cnn", "--variants", "before,batched", "--filters", "8", "--tasks", "2", "--steps",
               "2", "--iters", "1", "--warmup", "0", "--rounds", "1")
    assert "learn2learn-style OmniglotCNN-8 + BN" in out
    assert "float64 meta-gradient equal to before's (max <= 1e-10): batched; different: none" in out


def test_bad_arguments_are_rejected():
    proc = subprocess.run([sys.executable, SCRIPT, "--workload", "sinusoid", "--tasks", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--tasks and --iters must be >= 1" in proc.stderr
