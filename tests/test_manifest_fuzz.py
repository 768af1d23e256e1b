"""Fuzzing the manifest reader: any input either parses (and plans) or raises MimoCkptError.

Inputs are a real manifest with random edits (values replaced by arbitrary JSON, keys dropped or
added, lists cut) and raw bytes. Nothing else may escape: no KeyError, TypeError, RecursionError...
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimo_ckpt import MimoCkptError, ModuleLayout, ThreadWorld
from mimo_ckpt.model.box import Box
from mimo_ckpt.plan.load import plan_tensor_reads
from mimo_ckpt.format.manifest import MANIFEST_PATH, Manifest, encode_manifest
from tests.conftest import run_threads

LAYOUTS = {"images": ModuleLayout(tp=2), "language": ModuleLayout(pp=2, rank_offset=2)}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["F32", "BF16", "images/r00000.safetensors", "../x", "/abs", "0000abcd"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def seed_manifest(tmp_path_factory):
    import mimo_ckpt
    from mimo_ckpt.io.storage import LocalStorage
    from examples.synthetic_state import rank_state

    path = tmp_path_factory.mktemp("fuzz") / "ckpt"

    def fn(comm, rank):
        state = {m: rank_state(m, l, rank) for m, l in LAYOUTS.items() if l.contains(rank)}
        mimo_ckpt.save(state, path, layouts=LAYOUTS, comm=comm, storage=LocalStorage(path))
    assert run_threads(ThreadWorld(4), fn)[1] == {}
    return json.loads((path / MANIFEST_PATH).read_bytes())


def _containers(doc, path=()):
    yield path, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _containers(v, path + (k,))


def _mutate(doc, data):
    for _ in range(data.draw(st.integers(1, 3))):
        places = list(_containers(doc))
        _, target = places[data.draw(st.integers(0, len(places) - 1))]
        action = data.draw(st.sampled_from(["replace", "drop", "add", "cut"]))
        keys = list(target.keys()) if isinstance(target, dict) else list(range(len(target)))
        if action == "add" and isinstance(target, dict):
            target[data.draw(st.text(max_size=8))] = data.draw(json_values)
        elif action == "add":
            target.append(data.draw(json_values))
        elif not keys:
            continue
        elif action == "replace":
            target[data.draw(st.sampled_from(keys))] = data.draw(json_values)
        elif action == "drop":
            del target[data.draw(st.sampled_from(keys))]
        elif isinstance(target, list):
            del target[data.draw(st.integers(0, len(target))):]
    return doc


def _encoded(doc) -> bytes:
    try:
        return encode_manifest(doc)  # a valid checksum, so the checks past it are fuzzed
    except (MimoCkptError, ValueError):  # NaN, or nothing left to encode
        return json.dumps(doc).encode()


def _read_and_plan(blob: bytes) -> None:
    try:
        manifest = Manifest.from_bytes(blob, source="fuzz")
        for name, entry in manifest.modules.items():
            for key, tensor in entry.tensors.items():
                plan_tensor_reads(name, key, tensor, Box((0,) * len(tensor.global_shape), tensor.global_shape))
    except MimoCkptError:
        pass


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_edited_manifests_parse_or_raise_our_error(seed_manifest, data):
    doc = _mutate(json.loads(json.dumps(seed_manifest)), data)
    _read_and_plan(_encoded(doc))


@settings(max_examples=1000, deadline=None)
@given(blob=st.binary(max_size=300) | st.text(max_size=200).map(str.encode) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_parse_or_raise_our_error(blob):
    _read_and_plan(blob)


def test_the_unedited_manifest_parses(seed_manifest):
    manifest = Manifest.from_bytes(encode_manifest(seed_manifest))
    assert set(manifest.modules) == set(LAYOUTS)
