"""Object values round-trip exactly through the tagged JSON of `object_codec` (format version 3):
the codec alone, a real save and load, version 2 manifests read as plain JSON, and refusals."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mimo_ckpt
from mimo_ckpt import ManifestError, ModuleLayout, ObjectShard, ShardError, TensorShard, ThreadWorld
from mimo_ckpt.format.manifest import FORMAT_VERSION, MANIFEST_PATH, Manifest, encode_manifest
from mimo_ckpt.format.object_codec import TAG, decode, encode

MODULE = {"m": ModuleLayout()}

# megatron's DistributedOptimizer keys bucket sizes by (param dtype, grad dtype).
PER_BUCKET_NUMEL = {(torch.float32, torch.float32): [1024, 512], (torch.bfloat16, torch.float32): [256]}

CASES = {
    "tuple": (1, "a", None, 2.5),
    "empty tuple": (),
    "nested tuples": ((1, 2), [3, (4,)], {"t": (5,)}),
    "set": {"b", "a", "c"},
    "empty set": set(),
    "frozenset": frozenset({1, (2, 3)}),
    "bytes": b"\x00\xffmimo",
    "int keys": {1: "a", -2: "b", 2**80: "c"},
    "mixed keys": {"s": 1, 2: 2, 2.5: 3, True: 4, None: 5, (1, "x"): 6, torch.bfloat16: 7, frozenset({8}): 8},
    "dtype values": [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn],
    "per_bucket_numel": PER_BUCKET_NUMEL,
    "reserved key": {TAG: ["tuple", [1]], "other": 1},
    "reserved key alone": {TAG: ["bytes", "AA=="]},
    "deep": {"a": [{"b": ({1: {frozenset({(torch.float16, b"x")})}},)}]},
    "plain": {"lr": 1e-4, "steps": [1, 2], "name": "adam", "on": True, "none": None, "big": 2**100},
}


def _same(a, b) -> bool:
    """Equal and of the same types throughout (plain == takes 1 for True, a set for a frozenset)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, io.BytesIO):
        return a.getvalue() == b.getvalue() and b.tell() == 0
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(_same(ka, kb) and _same(va, vb)
                                        for (ka, va), (kb, vb) in zip(a.items(), b.items()))
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(_same(x, y) for y in b) for x in a)
    return a == b


def _through_json(value):
    return decode(json.loads(json.dumps(encode(value), allow_nan=False)))


@pytest.mark.parametrize("name", CASES)
def test_every_kind_round_trips_exactly(name):
    assert _same(_through_json(CASES[name]), CASES[name])


def test_same_rejects_what_json_alone_would_blur():
    # The checks above are only as strict as `_same`.
    assert not _same((1,), [1]) and not _same({1}, frozenset({1})) and not _same(True, 1)
    assert not _same({1: "a"}, {"1": "a"}) and not _same(b"a", io.BytesIO(b"a"))


def test_plain_json_is_stored_as_itself():
    value = CASES["plain"] | {"nested": {"list": [{"a": []}, "x"]}}
    assert encode(value) == value
    assert json.dumps(encode(value)) == json.dumps(value)


def test_megatron_per_bucket_numel_is_a_dict_keyed_by_dtype_tuples():
    dtype_pair = {TAG: ["tuple", [{TAG: ["dtype", "float32"]}, {TAG: ["dtype", "float32"]}]]}
    assert encode(PER_BUCKET_NUMEL)[TAG][1][0] == [dtype_pair, [1024, 512]]


def test_bytesio_is_stored_as_bytes_and_comes_back_as_bytesio_at_its_start():
    buf = io.BytesIO()
    torch.save({"scale": torch.tensor(2.0)}, buf)  # as megatron keeps some state
    assert encode(buf)[TAG][0] == "bytesio"
    back = _through_json(buf)
    assert isinstance(back, io.BytesIO) and back.getvalue() == buf.getvalue() and back.tell() == 0
    assert torch.load(back)["scale"].item() == 2.0


def test_a_user_dict_holding_the_reserved_key_is_escaped():
    value = {TAG: ["tuple", [1]]}
    assert encode(value) == {TAG: ["dict", [[TAG, ["tuple", [1]]]]]}
    assert _same(decode(encode(value)), value)  # not the tuple (1,) it would read as unescaped


def test_sets_are_stored_in_a_fixed_order():
    # Sorted by JSON text, not in hash order (which differs between processes for strings).
    assert encode({"b", "c", "a"}) == {TAG: ["set", ["a", "b", "c"]]}
    assert encode(frozenset({(2,), 1}))[TAG][1] == [1, {TAG: ["tuple", [2]]}]


supported_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=6) | st.binary(max_size=6)
                     | st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, TAG]))
hashables = st.recursive(supported_scalars, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3), max_leaves=6)
supported = st.recursive(
    supported_scalars,
    lambda c: (st.lists(c, max_size=3) | st.tuples(c, c) | st.sets(hashables, max_size=3)
               | st.dictionaries(hashables, c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3)
               | st.binary(max_size=8).map(io.BytesIO)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(supported)
def test_any_supported_value_round_trips(value):
    assert _same(_through_json(value), value)


tagged_junk = st.recursive(
    st.none() | st.integers() | st.text(max_size=4) | st.sampled_from(
        [TAG, "tuple", "set", "frozenset", "bytes", "bytesio", "dtype", "dict", "float32", "cuda", "AA==", "@@"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from([TAG, "a"]), c, max_size=2),
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(tagged_junk)
def test_decoding_arbitrary_json_gives_a_value_or_a_manifest_error(doc):
    try:
        decode(doc, "where")
    except ManifestError as exc:
        assert str(exc).startswith("where: bad __mimo__ encoding")


# --- through save and load -----------------------------------------------------------------------


def _save(path, objects):
    state = {"m": {"w": TensorShard.whole("w", torch.arange(4.0)), **{k: ObjectShard(k, v) for k, v in objects.items()}}}
    mimo_ckpt.save(state, path, layouts=MODULE, comm=ThreadWorld(1).comm(0))


def _load(path, keys):
    targets = {"m": {"w": TensorShard.whole("w", torch.zeros(4)), **{k: ObjectShard(k, None) for k in keys}}}
    return mimo_ckpt.load(targets, path, layouts=MODULE, comm=ThreadWorld(1).comm(0)).state["m"]


def test_save_and_load_round_trip_every_kind(tmp_path):
    objects = {name.replace(" ", "_"): value for name, value in CASES.items()}
    objects["bytesio"] = io.BytesIO(b"\x01\x02")
    _save(tmp_path / "c", objects)
    doc = json.loads((tmp_path / "c" / MANIFEST_PATH).read_bytes())
    assert doc["version"] == FORMAT_VERSION == 3
    assert doc["modules"]["m"]["objects"]["tuple"]["values"][0]["value"] == encode(CASES["tuple"])
    loaded = _load(tmp_path / "c", objects)
    for key, value in objects.items():
        assert _same(loaded[key], value), key
    assert torch.equal(loaded["w"], torch.arange(4.0))


def _with_object(path, version, value):
    """The manifest at `path` rewritten as `version`, its object `cfg` holding `value`, signed."""
    doc = json.loads((path / MANIFEST_PATH).read_bytes())
    doc["version"] = version
    doc["modules"]["m"]["objects"]["cfg"]["values"][0]["value"] = value
    blob = encode_manifest(doc)
    (path / MANIFEST_PATH).write_bytes(blob)
    return blob


def test_a_version_2_manifest_holding_the_tag_reads_back_verbatim(tmp_path):
    plain = {TAG: ["tuple", [1, 2]], "n": [{TAG: ["dtype", "float32"]}]}
    _save(tmp_path / "c", {"cfg": 0})
    blob = _with_object(tmp_path / "c", 2, plain)
    assert _same(_load(tmp_path / "c", ["cfg"])["cfg"], plain)
    assert Manifest.from_bytes(blob).to_bytes() == blob  # written back as version 2: plain
    # The same document as version 3 holds tags: the version alone decides.
    _with_object(tmp_path / "c", 3, {TAG: ["tuple", [1, 2]]})
    assert _same(_load(tmp_path / "c", ["cfg"])["cfg"], (1, 2))


@pytest.mark.parametrize("bad, message", [
    ({TAG: ["nope", 1]}, "unknown tag 'nope'"),
    ({TAG: ["tuple", 1]}, "payload must be a list"),
    ({TAG: ["tuple", [1]], "x": 1}, "only key"),
    ({TAG: "tuple"}, "only key"),
    ({TAG: ["set", [[1]]]}, "unhashable"),
    ({TAG: ["dict", [[1, 2], [1, 3]]]}, "key repeats"),
    ({TAG: ["bytes", "@@"]}, "bad __mimo__ encoding"),
    ({TAG: ["dtype", "torch.float32"]}, "not a torch dtype name"),
])
def test_a_bad_encoding_in_version_3_is_a_manifest_error(tmp_path, bad, message):
    _save(tmp_path / "c", {"cfg": 0})
    blob = _with_object(tmp_path / "c", 3, {"ok": [bad]})
    with pytest.raises(ManifestError, match=f"m.json: module 'm', object 'cfg', offset \\[\\]: .*{message}"):
        Manifest.from_bytes(blob, source="m.json")
    assert Manifest.from_bytes(_with_object(tmp_path / "c", 2, {"ok": [bad]})).version == 2  # plain there


def test_a_dtype_name_torch_lacks_fails_the_load(tmp_path):
    _save(tmp_path / "c", {"cfg": 0})
    _with_object(tmp_path / "c", 3, {TAG: ["dtype", "cuda"]})  # the reader checks only its form
    with pytest.raises(ManifestError, match="module 'm', object 'cfg': .*'cuda' is not a torch dtype"):
        _load(tmp_path / "c", ["cfg"])


def test_reading_a_manifest_with_dtypes_needs_no_torch(tmp_path):
    _save(tmp_path / "c", {"cfg": PER_BUCKET_NUMEL})
    code = ("import sys; from mimo_ckpt.format.manifest import Manifest; "
            "m = Manifest.from_bytes(open(sys.argv[1], 'rb').read()); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(m.modules['m'].objects))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c" / MANIFEST_PATH)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "1\n", out.stderr


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, what", [
    (object(), "object at value"),
    (lambda: 1, "function at value"),
    ({"x": [np.zeros(2)]}, "ndarray at value['x'][0]"),
    ((1, torch.ones(1)), "Tensor at value[1]"),
    ({(1, 2): bytearray(b"a")}, "bytearray at value[(1, 2)]"),
    ({"loss": [float("nan")]}, "nan (the manifest is standard JSON) at value['loss'][0]"),
    ({frozenset({1}): {1: float("inf")}}, "inf (the manifest is standard JSON)"),
])
def test_an_unsupported_object_is_refused_naming_module_and_key(tmp_path, value, what):
    with pytest.raises(ShardError) as info:
        _save(tmp_path / "c", {"cfg": value})
    text = str(info.value)
    assert text.startswith("module 'm', object 'cfg': ") and what in text, text
    assert "tuple, set, frozenset, bytes, io.BytesIO, torch.dtype" in text or "standard JSON" in text
    assert not (tmp_path / "c" / MANIFEST_PATH).exists()


def test_a_value_that_contains_itself_is_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ShardError, match="where: nests too deeply"):
        encode(loop, "where")


def test_the_encoded_form_is_held_to_the_manifest_depth_limit(tmp_path):
    deep: tuple = ()
    for _ in range(25):  # 25 levels of tuple are 75 of JSON
        deep = (deep,)
    with pytest.raises(ShardError, match="object 'cfg'.*deeper than 64"):
        _save(tmp_path / "c", {"cfg": deep})
