"""The converters' shared readers, writer and command-line flags."""

import argparse
import importlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_conversion import common
from recurrent_lm.core.config import PARAM_DTYPES
from recurrent_lm.models import gemma


def state():
    return {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "b.bias": (np.arange(5, dtype=np.float32) / 3).astype(jnp.bfloat16),
        "c.steps": np.arange(4, dtype=np.int64),
    }


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert np.asarray(actual[name]).dtype == value.dtype, name
        np.testing.assert_array_equal(np.asarray(actual[name]), value, err_msg=name)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "w.pth", "w.bin"])
def test_write_then_read_keeps_values_and_dtypes(tmp_path, name):
    if not name.endswith(".safetensors"):
        pytest.importorskip("torch")
    path = tmp_path / name
    common.write_weights(state(), path)
    assert_same(common.read_weights(path), state())


def test_sharded_safetensors_index(tmp_path):
    expected = state()
    shards = {"model-00001-of-00002.safetensors": ["a.weight"],
              "model-00002-of-00002.safetensors": ["b.bias", "c.steps"]}
    weight_map = {}
    for shard, names in shards.items():
        common.write_weights({n: expected[n] for n in names}, tmp_path / shard)
        weight_map.update({n: shard for n in names})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same(common.read_weights(index), expected)


def test_torch_tensors_become_numpy_with_bfloat16_kept():
    torch = pytest.importorskip("torch")
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
    array = common.to_numpy(value)
    assert isinstance(array, np.ndarray) and array.dtype == jnp.bfloat16
    np.testing.assert_array_equal(array.astype(np.float32), value.float().numpy())
    plain = np.zeros(3)
    assert common.to_numpy(plain) is plain


def test_bad_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="absent.safetensors does not exist"):
        common.read_weights(tmp_path / "absent.safetensors")
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        common.read_weights(npz)
    with pytest.raises(ValueError, match="use a .safetensors name"):
        common.write_weights(state(), tmp_path / "w.npz")
    pickled = tmp_path / "w.pt"
    pickled.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(ImportError, match="w.pt: pickled PyTorch files need torch; install"):
        common.read_weights(pickled)
    with pytest.raises(ImportError, match="pip install torch"):
        common.write_weights(state(), tmp_path / "out.pth")


def test_non_tensor_pickles_need_weights_only_false(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="pass weights_only=False"):
        common.read_weights(path)
    loaded = common.read_weights(path, weights_only=False)
    np.testing.assert_array_equal(common.to_numpy(loaded["state_dict"]["w"]), np.ones(2))


def test_converters_import_without_torch():
    code = (
        "import sys; import checkpoints_conversion.rwkv, checkpoints_conversion.h3,"
        " checkpoints_conversion.gemma, checkpoints_conversion.recurrentgemma;"
        " sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_config_flags_are_typed_and_default_to_none():
    parser = argparse.ArgumentParser()
    common.add_config_flags(
        parser, gemma.GemmaConfig,
        ["sliding_window_size", "final_logit_soft_cap", "query_head_dim_normalize", "param_dtype"],
        param_dtype=PARAM_DTYPES,
    )
    args = parser.parse_args(["--sliding-window-size", "7", "--final-logit-soft-cap", "2.5",
                              "--query-head-dim-normalize", "false"])
    assert vars(args) == {"sliding_window_size": 7, "final_logit_soft_cap": 2.5,
                          "query_head_dim_normalize": False, "param_dtype": None}
    for bad in (["--query-head-dim-normalize", "no"], ["--param-dtype", "int8"],
                ["--sliding-window-size", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


CONVERTERS = {"gemma": [], "recurrentgemma": [], "rwkv": [], "h3": ["--preset", "125m"]}
"""Each converter's module and the flags its ``convert`` needs."""


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_convert_reports_user_errors_in_one_line(name, tmp_path, capsys):
    main = importlib.import_module(f"checkpoints_conversion.{name}").main
    missing, dst = tmp_path / "missing", tmp_path / "out"
    assert main(["convert", str(missing), str(dst), *CONVERTERS[name]]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert str(missing) in line and "not" in line  # "does not exist" / "not found"
    assert not dst.exists()
    dst.mkdir()
    assert main(["convert", str(missing), str(dst), *CONVERTERS[name]]) == 2
    err = capsys.readouterr().err  # the destination is checked before any (long) load
    assert err == f"error: {dst} already exists; choose a new directory.\n"


def test_convert_module_exits_with_status_2_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoints_conversion.rwkv", "convert", str(tmp_path / "missing"),
         str(tmp_path / "out")],
        capture_output=True, text=True, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {tmp_path / 'missing'} does not exist.\n"
