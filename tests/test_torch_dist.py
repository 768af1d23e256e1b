"""What importing a torch_dist checkpoint refuses to unpickle (the round trip through megatron's
own save and load runs in tests/test_megatron_mimo.py)."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mimo_ckpt.errors import ManifestError, UnsafeCheckpointError
from mimo_ckpt.interop.torch_dist import import_torch_dist, read_index


class Sneaky:
    """Unpickling it would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class NotPlainData:
    def __init__(self):
        self.x = 1


def _dcp(tmp_path, state):
    path = str(tmp_path / "ckpt")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return path


def test_an_index_that_would_run_code_is_refused_without_running_it(tmp_path):
    path = _dcp(tmp_path, {"language_model.w": torch.ones(2)})
    marker = tmp_path / "ran"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump({"x": Sneaky(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        read_index(path)
    assert not marker.exists()


def test_objects_beyond_plain_data_need_allow_pickle(tmp_path):
    # DCP stores a non-tensor value as a torch.save record; megatron's ShardedObjects are lists.
    path = _dcp(tmp_path, {"language_model.w": torch.arange(4.0), "language_model.obj/shard_0_1": [NotPlainData()]})
    with pytest.raises(UnsafeCheckpointError, match="language_model.obj/shard_0_1.*--allow-pickle"):
        import_torch_dist(path, str(tmp_path / "a"), progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()
    # Trusted: unpickled, but an object that cannot be stored is listed as dropped, not stored.
    report = import_torch_dist(path, str(tmp_path / "b"), allow_pickle=True, progress=False)
    assert report.tensors == 1 and report.objects == 0
    assert len(report.dropped) == 1
    assert report.dropped[0].startswith("language_model.obj/shard_0_1: value of type NotPlainData at value cannot be stored")


def test_keys_without_a_mimo_module_are_an_error(tmp_path):
    path = _dcp(tmp_path, {"decoder.w": torch.ones(2)})
    with pytest.raises(Exception, match="names no MIMO module"):
        import_torch_dist(path, str(tmp_path / "a"), progress=False)
    with pytest.raises(ManifestError, match="not a torch_dist checkpoint"):
        read_index(str(tmp_path))


def test_cli_import_reports_refusal_as_an_error(tmp_path):
    path = _dcp(tmp_path, {"language_model.w": torch.ones(2), "language_model.obj/shard_0_1": [NotPlainData()]})
    out = subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", "import", path, str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--allow-pickle" in out.stderr
