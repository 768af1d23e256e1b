"""The on-disk format: schema, safetensors compatibility, and the reader's checks."""

import json

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

import mimo_ckpt
from mimo_ckpt import ManifestError, ModuleLayout, ShardError, ThreadWorld
from mimo_ckpt.format.manifest import Manifest, encode_manifest
from mimo_ckpt.io.storage import LocalStorage
from tests.conftest import run_threads
from examples.synthetic_state import global_tensors, rank_state

LAYOUTS = {"images": ModuleLayout(tp=2), "language": ModuleLayout(tp=2, pp=2, rank_offset=2)}
SCHEMA = json.load(open("docs/manifest.schema.json"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.conftest import run_threads

    root = tmp_path_factory.mktemp("fmt")

    def fn(comm, rank):
        state = {m: rank_state(m, l, rank) for m, l in LAYOUTS.items() if l.contains(rank)}
        mimo_ckpt.save(state, root, layouts=LAYOUTS, comm=comm, metadata={"step": 7})
    _, errors = run_threads(ThreadWorld(6), fn)
    assert not errors, errors
    return root


def test_manifest_matches_schema(ckpt):
    doc = json.loads((ckpt / "manifest.json").read_bytes())
    jsonschema.validate(doc, SCHEMA)
    assert doc["metadata"] == {"step": 7}


def test_shard_files_are_safetensors_holding_the_reference_boxes(ckpt):
    doc = json.loads((ckpt / "manifest.json").read_bytes())
    checked = 0
    for module, entry in doc["modules"].items():
        ref = global_tensors(module)
        for key, tensor in entry["tensors"].items():
            for shard in tensor["shards"]:
                stored = load_file(str(ckpt / shard["file"]))[f"{key}@{','.join(map(str, shard['offset']))}"]
                want = ref[key]
                for dim, (o, s) in enumerate(zip(shard["offset"], shard["shape"])):
                    want = want.narrow(dim, o, s)
                assert stored.dtype == want.dtype and torch.equal(stored, want), key
                raw = (ckpt / shard["file"]).read_bytes()[shard["begin"]:shard["end"]]
                assert raw == want.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                checked += 1
    assert checked > 20


def test_shard_data_starts_on_a_cache_line(ckpt):
    files = sorted(ckpt.glob("*/*.safetensors"))
    for f in files:
        header_len = int.from_bytes(f.read_bytes()[:8], "little")
        assert (8 + header_len) % 64 == 0, f
        assert f.read_bytes()[8 + header_len - 1 : 8 + header_len] in (b" ", b"}"), f
    assert len(files) > 2


def _mutated(ckpt, edit):
    doc = json.loads((ckpt / "manifest.json").read_bytes())
    edit(doc)
    return encode_manifest(doc)  # a valid checksum: the checks past it are under test


def _first_shard(doc):
    return doc["modules"]["images"]["tensors"]["vision.proj.weight"]["shards"][0]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=4), "unsupported format version 4"),
    (lambda d: d.update(format="other"), "format must be"),
    (lambda d: _first_shard(d).update(file="../../etc/passwd"), "not a plain relative path"),
    (lambda d: _first_shard(d).update(file="/etc/passwd"), "not a plain relative path"),
    (lambda d: _first_shard(d).update(file="language/r00002.safetensors"), "outside module directory"),
    (lambda d: _first_shard(d).update(end=_first_shard(d)["end"] + 4), "does not hold"),
    (lambda d: _first_shard(d).update(offset=[20, 0]), "outside global shape"),
    (lambda d: _first_shard(d).update(crc32c="xyz"), "crc32c"),
    (lambda d: d["modules"]["images"]["layout"].update(tp=0), "tp=0"),
    (lambda d: d["modules"]["images"]["tensors"]["vision.proj.weight"].update(dtype="F128"), "unknown dtype"),
])
def test_reader_rejects_bad_manifests_with_a_named_error(ckpt, edit, message):
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_bytes(_mutated(ckpt, edit), source="m.json")
    assert "m.json" in str(info.value)


@pytest.mark.parametrize("blob", [b"{not json", b'{"format": NaN}', b'{"format": -Infinity}'])
def test_reader_rejects_invalid_json(blob):
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_bytes(blob)


@pytest.mark.parametrize("value", [float("nan"), {"best_loss": float("inf")}, [1, float("-inf")]])
def test_objects_and_metadata_must_be_standard_json(tmp_path, value):
    layouts = {"images": ModuleLayout()}
    ok = {"images": {"w": torch.zeros(3), "step": 1}}
    cases = [({"images": {"w": torch.zeros(3), "stats": value}}, None, "module 'images', object 'stats'"),
             (ok, {"run": value}, "save metadata")]
    for n, (state, metadata, where) in enumerate(cases):
        path = tmp_path / f"c{n}"
        _, errors = run_threads(ThreadWorld(1), lambda comm, rank: mimo_ckpt.save(
            state, str(path), layouts=layouts, comm=comm, metadata=metadata))
        assert isinstance(errors[0], ShardError) and where in str(errors[0]), errors
        assert not (path / "manifest.json").exists()


def test_flipped_byte_is_detected_on_load(ckpt, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(ckpt, copy)
    shard = _first_shard(json.loads((copy / "manifest.json").read_bytes()))
    path = copy / shard["file"]
    data = bytearray(path.read_bytes())
    data[shard["begin"] + 5] ^= 0x40
    path.write_bytes(bytes(data))

    def fn(comm, rank):
        targets = {m: rank_state(m, l, rank, fill=0.0) for m, l in LAYOUTS.items() if l.contains(rank)}
        mimo_ckpt.load(targets, copy, layouts=LAYOUTS, comm=comm, storage=LocalStorage(copy))
    _, errors = run_threads(ThreadWorld(6), fn)
    assert sorted(errors) == list(range(6))
    assert isinstance(errors[0], mimo_ckpt.CorruptShardError) and shard["file"] in str(errors[0])


def test_cli_inspect_reads_the_manifest_without_torch(ckpt):
    import subprocess
    import sys

    code = ("import sys, mimo_ckpt.cli as c; rc = c.main(['inspect', sys.argv[1], '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["modules"]["language"]["ranks"] == [2, 5]
    t = summary["modules"]["images"]["tensors"]["vision.proj.weight"]
    assert t == {"dtype": "F32", "shape": [24, 10], "shards": 2, "bytes": 24 * 10 * 4}
    bad = subprocess.run([sys.executable, "-m", "mimo_ckpt.cli", "inspect", str(ckpt / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr and bad.stderr.count("\n") == 1
