"""Fixtures; helpers live in `griffin_cases` (this directory is on sys.path)."""

import gc
import os
import pathlib

# The suite compiles the same small programs in many processes (the xdist workers, the CLI
# subprocesses, the notebook kernels): XLA's persistent cache lets each compile once. Set
# through the environment so that the subprocesses inherit it, before JAX is imported.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compilation"),
)
# Only programs that take a second or more: writing an executable costs about as much as
# compiling a small one, and small ones are rarely compiled twice (measured on the full
# suite: writing every program over 0.2 s cost ~13 % of its wall time; the workers hit the
# cache 8 times in 5,800 compiles).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
# The suite runs on CPU. libtpu (the dev extra, for --compile-only) would otherwise make
# every process, subprocesses and notebook kernels included, probe for a TPU (~2 s, warnings).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are tiny and compiled far more often than they run (eager penzai
# calls compile op by op): XLA:CPU without its backend optimisations and fusion emitters
# compiles about 2.5x faster (60 -> 25 ms per op here). Numerics stay IEEE float32;
# parity bounds are unchanged. Appended so that a caller's flags are kept.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax
import pytest
from griffin_cases import CASES, OfficialCase

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def official_case(request) -> OfficialCase:
    return CASES[request.param]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # A full garbage collection walks every live object, and a worker accumulates millions that
    # live for the whole session (JAX's trace and compile caches, imported modules, session
    # fixtures); BlinkDL's runtime even calls gc.collect() once per layer it loads. Measured on
    # tests/sampling + interp + the BlinkDL file: 41 s of 249 s went to full collections. Freezing
    # what exists before each test makes collections scan only that test's objects (1.8 s; peak
    # memory unchanged).
    gc.freeze()


# The longest test files (measured: full suite, 2 workers), started first. With
# `--dist loadfile --no-loadscope-reorder` (the Makefile) xdist hands out files in
# collection order; a long file started last leaves the other worker idle for its
# length (the notebooks alone run ~2 min). Order only: every file still runs.
LONGEST_FIRST = (
    "tests/test_notebooks.py",
    "tests/train/test_train_loop.py",
    "tests/models/test_scanned_layers.py",
    "tests/test_synthetics.py",
    "tests/train/test_plain_text.py",
    "tests/train/test_architectures.py",
    "tests/models/test_rwkv7.py",
    "tests/models/test_mamba.py",
    "tests/train/test_compile_only.py",
    "tests/sampling/test_generate.py",
    "tests/train/test_loss_and_optimizer.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))

