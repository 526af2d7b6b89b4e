"""Test-wide settings: offline HF libraries, one intra-op thread, a private HF home.

These must be set before transformers / datasets / evaluate are imported anywhere, so they live at
the top of the root conftest.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

_HF_HOME = tempfile.mkdtemp(prefix="ernie5-hf-home-")
# Removed when the session ends, so repeated runs do not pile up directories in /tmp.
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    # The MoE loops are ~50x slower with 2 intra-op threads on the 2-core CI machine.
    "OMP_NUM_THREADS": "1",
    "HF_HOME": _HF_HOME,
    "HF_MODULES_CACHE": os.path.join(_HF_HOME, "modules"),
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
# Triton reads TRITON_INTERPRET when it is first imported (and when a kernel is defined); set it before any test
# module can import transformers or torch code that pulls Triton in, so the kernels run on the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# First lines of a subprocess script that must run as on a machine with only transformers and a saved folder: the
# installed ernie5 packages (editable installs included) become unimportable, and the script checks that they are.
WITHOUT_ERNIE5_PACKAGES = """
import importlib.abc, sys

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_ernie5", "processing", "training", "eval", "examples"):
            raise ImportError(name + " hidden by the test")
        return None

sys.meta_path.insert(0, HidePackage())
try:
    import modeling_ernie5
    raise SystemExit("package importable: the test is not isolating it")
except ImportError:
    pass
"""


def run_without_ernie5(script: str, cwd, timeout: float = 240, **env: str) -> str:
    """Run `script` (dedented) in a fresh Python process that cannot import the ernie5 packages, with `env` added to
    the environment; fail the test with its stderr unless it exits 0, else return its stdout."""
    full_env = {**os.environ, "PYTHONPATH": "", **env}
    result = subprocess.run([sys.executable, "-c", WITHOUT_ERNIE5_PACKAGES + textwrap.dedent(script)], cwd=cwd,
                            env=full_env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture
def without_ernie5_packages():
    """`run_without_ernie5`: runs a script where only transformers and saved folders are there to import."""
    return run_without_ernie5
