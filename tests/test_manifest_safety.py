"""Data safety of the manifest and the files it names: the manifest's own checksum, a strict JSON
reader, bounded numbers and nesting, reserved module names, the overlap search on hostile
tilings, and `verify_checkpoint` checking each data file against the manifest."""

import json
import struct

import crc32c
import pytest
import torch

import mimo_ckpt
from mimo_ckpt import ManifestError, ModuleLayout, ShardError, ThreadWorld
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest, encode_manifest
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.storage import LocalStorage
from mimo_ckpt.offline.verify import verify_checkpoint

LAYOUTS = {"images": ModuleLayout()}
TRAILER = b',"manifest_crc32c":"%08x"}'


def _save(path, state, metadata=None, layouts=LAYOUTS):
    mimo_ckpt.save(state, path, layouts=layouts, comm=ThreadWorld(1).comm(0), metadata=metadata)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "ckpt"
    state = {"images": {
        "w": torch.arange(24, dtype=torch.float32).reshape(4, 6),
        "b": torch.arange(5, dtype=torch.int64),
        "sched": {"step": 1},
    }}
    _save(path, state, metadata={"step": 1})
    return path


def _doc(version=1, modules=None, metadata="{}"):
    """A hand-written manifest, as text, so that keys can repeat and numbers can overflow."""
    return (f'{{"format":"mimo-ckpt","version":{version},"world_size":1,"metadata":{metadata},'
            f'"modules":{json.dumps(modules or {})}}}').encode()


def _module(tensors=None):
    return {"layout": ModuleLayout().to_json(), "tensors": tensors or {}, "objects": {}}


def _tensor(shape, boxes, dtype="U8", itemsize=1, begin=0):
    shards = []
    for offset, box_shape in boxes:
        n = itemsize
        for s in box_shape:
            n *= s
        shards.append({"offset": list(offset), "shape": list(box_shape), "file": "images/r0.safetensors",
                       "begin": begin, "end": begin + n, "crc32c": "00000000"})
        begin += n
    return {"dtype": dtype, "shape": list(shape), "shards": shards}


# --- the manifest's checksum --------------------------------------------------------------------


def test_written_manifest_is_version_3_and_ends_with_its_checksum(saved):
    blob = (saved / MANIFEST_PATH).read_bytes()
    body = blob[: -len(TRAILER % 0)] + b"}"
    assert blob == body[:-1] + TRAILER % crc32c.crc32c(body)
    assert json.loads(blob)["version"] == 3
    assert Manifest.from_bytes(blob).to_bytes() == blob


@pytest.mark.parametrize("old, new", [
    (b'"metadata":{"step":1}', b'"metadata":{"step":9}'),
    (b'"value":{"step":1}', b'"value":{"step":9}'),
])
def test_an_edited_manifest_is_corrupt(saved, old, new):
    blob = (saved / MANIFEST_PATH).read_bytes()
    assert blob.count(old) == 1
    with pytest.raises(ManifestError, match="m.json: manifest is corrupt"):
        Manifest.from_bytes(blob.replace(old, new), source="m.json")


def test_a_re_encoded_or_unsigned_version_2_manifest_is_corrupt(saved):
    doc = json.loads((saved / MANIFEST_PATH).read_bytes())
    with pytest.raises(ManifestError, match="corrupt"):
        Manifest.from_bytes(json.dumps(doc).encode())  # spaces: not the writer's bytes
    del doc["manifest_crc32c"]
    with pytest.raises(ManifestError, match="corrupt"):
        Manifest.from_bytes(json.dumps(doc, separators=(",", ":")).encode())


def test_version_1_loads_without_a_checksum_but_not_with_a_wrong_one():
    blob = _doc(modules={"images": _module()})
    assert Manifest.from_bytes(blob).version == 1
    assert Manifest.from_bytes(encode_manifest(json.loads(blob))).version == 1
    with pytest.raises(ManifestError, match="corrupt"):
        Manifest.from_bytes(blob[:-1] + TRAILER % (crc32c.crc32c(blob) ^ 1))


# --- strict JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize("blob, message", [
    (b'{"format":"mimo-ckpt","format":"mimo-ckpt","version":1,"world_size":1,"modules":{}}',
     "duplicate key 'format'"),
    (_doc(metadata='{"a":{"x":1,"x":2}}'), "duplicate key 'x'"),
    (_doc(metadata='{"loss":1e999}'), "out of range"),
    (_doc(metadata='{"loss":-1e999}'), "out of range"),
    (_doc(metadata="[" * 100_000 + "]" * 100_000), "not valid JSON"),
    (_doc(metadata='{"a":' + "[" * 100 + "]" * 100 + "}"), "deeper than 64"),
    (_doc(metadata='{"\\udc80":1}'), "not valid unicode"),
    (_doc(metadata='{"a":["ok","\\uDC80"]}'), "not valid unicode"),
    (b'{"format":"mimo-ckpt","version":1,"world_size":1,"metadata":{"a":"\xed\xb2\x80"},"modules":{}}',
     "not valid JSON"),
])
def test_hostile_json_is_a_manifest_error(blob, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(blob)


def test_valid_non_bmp_text_still_loads():
    assert Manifest.from_bytes(_doc(metadata='{"note":"\\ud83d\\ude00"}')).metadata == {"note": "\U0001f600"}


# --- bounded numbers -----------------------------------------------------------------------------


def test_byte_offsets_past_2_48_are_refused():
    tensor = _tensor((4,), [((0,), (4,))], begin=2**63)
    with pytest.raises(ManifestError, match="2\\^48"):
        Manifest.from_bytes(_doc(modules={"images": _module({"w": tensor})}))


def test_tensors_of_more_than_2_48_elements_are_refused():
    tensor = _tensor((2**31, 2**31), [((0, 0), (2**31, 2**31))], dtype="F32", itemsize=4)
    with pytest.raises(ManifestError, match="more than 2\\^48 elements"):
        Manifest.from_bytes(_doc(modules={"images": _module({"w": tensor})}))


# --- hostile tilings -----------------------------------------------------------------------------


def _staircase(rows=2000):
    """4,000 boxes tiling (rows, rows + 1): row i is cut at column i + 1, so the grid of distinct
    cuts is too large to mark and every box starting at column 0 meets all the others there."""
    boxes = []
    for i in range(rows):
        boxes += [((i, 0), (1, i + 1)), ((i, i + 1), (1, rows - i))]
    return (rows, rows + 1), boxes


def test_a_hostile_tiling_of_4000_boxes_parses():
    shape, boxes = _staircase()
    manifest = Manifest.from_bytes(_doc(modules={"images": _module({"w": _tensor(shape, boxes)})}))
    assert len(manifest.modules["images"].tensors["w"].shards) == 4000


def test_a_hostile_overlap_among_4000_boxes_is_found():
    shape, boxes = _staircase()
    boxes[-2] = ((1999, 0), (1, 2001))  # the last row, whole: over the last box, one element more
    boxes[1] = ((0, 1), (1, 1999))  # one element less: the volumes still add up
    with pytest.raises(ManifestError, match="overlap"):
        Manifest.from_bytes(_doc(modules={"images": _module({"w": _tensor(shape, boxes)})}))


def test_coverage_is_checked_before_overlaps():
    tensor = _tensor((4,), [((0,), (4,)), ((2,), (2,))])
    with pytest.raises(ManifestError, match="hold 6 of the tensor's 4 elements"):
        Manifest.from_bytes(_doc(modules={"images": _module({"w": tensor})}))


# --- what save refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, where", [({"\udc80": 1}, "key '\\\\udc80'"), (["ok", "a\ud800"], "string 'a\\\\ud800'")])
def test_save_refuses_text_that_is_not_unicode(tmp_path, value, where):
    with pytest.raises(ShardError, match=f"object 'cfg': {where}"):
        _save(tmp_path / "c", {"images": {"w": torch.zeros(3), "cfg": value}})
    assert not (tmp_path / "c" / MANIFEST_PATH).exists()
    with pytest.raises(ShardError, match="save metadata: key"):
        _save(tmp_path / "d", {"images": {"w": torch.zeros(3)}}, metadata={"\udc80": 1})


def test_save_refuses_values_nested_too_deeply(tmp_path):
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ShardError, match="object 'cfg'.*deeper than 64"):
        _save(tmp_path / "c", {"images": {"w": torch.zeros(3), "cfg": deep}})


@pytest.mark.parametrize("name", ["manifest.json", "manifest.json.tmp-1", "latest"])
def test_reserved_module_names_are_refused_at_save_and_load(tmp_path, name):
    with pytest.raises(ManifestError, match="reserved"):
        _save(tmp_path / "c", {name: {"w": torch.zeros(3)}}, layouts={name: ModuleLayout()})
    with pytest.raises(ManifestError, match="reserved"):
        Manifest.from_bytes(_doc(modules={name: _module()}))


# --- verify: files against the manifest ----------------------------------------------------------


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    storage = LocalStorage(dst)
    return dst, storage, read_manifest(storage)


def _data_file(manifest):
    return manifest.modules["images"].tensors["w"].shards[0].file


def _edit_header(path, old, new):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    assert header.count(old) >= 1 and len(old) == len(new)
    path.write_bytes(data[:8] + header.replace(old, new, 1) + data[8 + n :])


def test_verify_passes_an_intact_checkpoint(saved):
    storage = LocalStorage(saved)
    assert verify_checkpoint(storage, read_manifest(storage), progress=False) == []


def test_verify_reports_bytes_appended_once(saved, tmp_path):
    dst, storage, manifest = _copy(saved, tmp_path)
    file = _data_file(manifest)
    with open(dst / file, "ab") as f:
        f.write(b"junk")
    bad = verify_checkpoint(storage, manifest, progress=False)
    assert len(bad) == 1 and file in str(bad[0]) and "appended" in bad[0].problem


@pytest.mark.parametrize("old, new", [(b'"dtype":"F32"', b'"dtype":"F62"'), (b'"shape"', b'"shaMe"')])
def test_verify_reports_a_header_that_disagrees_with_the_manifest(saved, tmp_path, old, new):
    dst, storage, manifest = _copy(saved, tmp_path)
    file = _data_file(manifest)
    _edit_header(dst / file, old, new)
    bad = verify_checkpoint(storage, manifest, progress=False)
    assert len(bad) == 1, bad
    assert bad[0].key in {"w", "b"} and file in str(bad[0]) and "header entry" in bad[0].problem


def test_verify_reports_a_header_entry_the_manifest_does_not_place(saved, tmp_path):
    dst, storage, manifest = _copy(saved, tmp_path)
    file = _data_file(manifest)
    _edit_header(dst / file, b'"w@0,0"', b'"v@0,0"')
    problems = [b.problem for b in verify_checkpoint(storage, manifest, progress=False)]
    assert any("no entry 'w@0,0'" in p for p in problems), problems
    assert any("lists 'v@0,0'" in p for p in problems), problems


def test_verify_reports_a_header_with_duplicate_keys(saved, tmp_path):
    dst, storage, manifest = _copy(saved, tmp_path)
    file = _data_file(manifest)
    _edit_header(dst / file, b'"shape":[4,6]', b'"dtype":"F32"')
    bad = verify_checkpoint(storage, manifest, progress=False)
    assert len(bad) == 1 and "unreadable" in bad[0].problem and "duplicate key 'dtype'" in bad[0].problem
