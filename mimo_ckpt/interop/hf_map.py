"""Hugging Face <-> megatron tensor mapping, planned from declarative tables (pure).

A table (`hf_tables/<name>.json`, or any JSON file of the same form) names, per architecture:

- `config`: the Hugging Face config.json fields an export starts from;
- `facts`: which config fields give the sizes the mapping needs (`hidden`, `heads`, `groups`,
  `head_dim`, `layers`, `ffn`, `vocab`, `tied`);
- `derive`: facts an export reads off stored shapes (`[megatron key, dim]`);
- `megatron`: each megatron tensor: `layers` (stacked over layers on dim 0, megatron's
  `decoder.layers.*`), `tp` (the per-layer dim tensor parallelism cuts), `vocab` (rows padded to
  the vocabulary multiple), `aliases` (other spellings an export accepts: megatron keys a
  layer's norms as fused into the next linear, `linear_qkv.layer_norm_weight`, under the local
  layer spec too; the unfused names are aliases), `unless` (a fact under which the tensor does
  not exist: `tied` output embeddings);
- `tensors`: each Hugging Face tensor (`{layer}` for per-layer ones) as rows of one megatron
  tensor chosen by `rows`, `transpose` for Conv1D-style `[in, out]` weights.

Row rules (megatron rows of one layer <-> rows of the Hugging Face tensor):

    all     every row
    q k v   megatron's fused QKV holds, per query group, the group's query heads, then its key
            head, then its value head; `q` (`k`, `v`) is every query (key, value) row in order
    qkv     all queries, then all keys, then all values (GPT-2's c_attn)
    gate up the first / second half of a gated linear unit's fc1 ([gate; up])
    vocab   the real vocabulary's rows; rows past it are padding (zero on import, cut on export)

Everything here is planning: which rows of which stored tensor make which rows of which file
tensor. interop.hf moves the bytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from mimo_ckpt.errors import MappingError
from mimo_ckpt.format.manifest import ModuleEntry
from mimo_ckpt.model.split import SplitSpec
from mimo_ckpt.plan.export import ExportPart, ExportTensor, Run

__all__ = [
    "TABLES_DIR", "Table", "HfExport", "MegatronPart", "MegatronTensor",
    "load_table", "table_names", "export_config", "plan_hf_export", "plan_hf_import", "padded_rows",
]

TABLES_DIR = os.path.join(os.path.dirname(__file__), "hf_tables")
_RULES = ("all", "q", "k", "v", "qkv", "gate", "up", "vocab")
_FACT_NAMES = ("hidden", "heads", "groups", "head_dim", "layers", "ffn", "vocab", "tied", "positions")
_LAYER = "{layer}"


@dataclass(frozen=True, slots=True)
class MegatronSpec:
    key: str
    aliases: tuple[str, ...] = ()
    layers: bool = False
    tp: int | None = None
    vocab: bool = False
    unless: str | None = None


@dataclass(frozen=True, slots=True)
class TensorRule:
    hf: str
    megatron: str
    rows: str = "all"
    transpose: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    about: str
    config: Mapping[str, Any]
    facts: Mapping[str, str]
    derive: Mapping[str, tuple[str, int]]
    megatron: Mapping[str, MegatronSpec]
    tensors: tuple[TensorRule, ...]
    source: str
    """Where the table came from, for messages."""


def table_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(TABLES_DIR) if f.endswith(".json"))


def load_table(name_or_path: str) -> Table:
    """A built-in table by name (`llama`, `gpt2`) or a table file."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(TABLES_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise MappingError(f"no mapping table {name_or_path!r}: give one of {table_names()} or a .json table file")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise MappingError(f"mapping table {path}: {exc}") from None
    return parse_table(doc, path)


def parse_table(doc: Any, source: str = "<table>") -> Table:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise MappingError(f"mapping table {source}: {what}")

    need(isinstance(doc, dict), "must be a JSON object")
    for field in ("name", "config", "facts", "megatron", "tensors"):
        need(field in doc, f"missing field {field!r}")
    need(isinstance(doc["config"], dict) and isinstance(doc["facts"], dict), "'config' and 'facts' must be objects")
    unknown = sorted(set(doc["facts"]) - set(_FACT_NAMES))
    need(not unknown, f"unknown facts {unknown} (known: {list(_FACT_NAMES)})")
    megatron = {}
    for key, spec in doc["megatron"].items():
        need(isinstance(spec, dict) and set(spec) <= {"layers", "tp", "vocab", "aliases", "unless"},
             f"megatron tensor {key!r}: fields are layers, tp, vocab, aliases, unless")
        megatron[key] = MegatronSpec(key, tuple(spec.get("aliases", ())), bool(spec.get("layers", False)),
                                     spec.get("tp"), bool(spec.get("vocab", False)), spec.get("unless"))
    rules = []
    for t in doc["tensors"]:
        need(isinstance(t, dict) and {"hf", "megatron"} <= set(t) <= {"hf", "megatron", "rows", "transpose"},
             f"tensor entry {t!r}: fields are hf, megatron, rows, transpose")
        rule = TensorRule(t["hf"], t["megatron"], t.get("rows", "all"), bool(t.get("transpose", False)))
        need(rule.rows in _RULES, f"tensor {rule.hf!r}: rows {rule.rows!r} is not one of {list(_RULES)}")
        need(rule.megatron in megatron, f"tensor {rule.hf!r}: megatron tensor {rule.megatron!r} is not in 'megatron'")
        need((_LAYER in rule.hf) == megatron[rule.megatron].layers,
             f"tensor {rule.hf!r}: '{_LAYER}' must appear exactly where the megatron tensor is stacked over layers")
        rules.append(rule)
    hf_names = [r.hf for r in rules]
    need(len(set(hf_names)) == len(hf_names), "a Hugging Face tensor is named twice")
    derive = {}
    for fact, where in doc.get("derive", {}).items():
        need(fact in _FACT_NAMES and isinstance(where, list) and len(where) == 2 and where[0] in megatron,
             f"derive {fact!r}: must be [megatron tensor of the table, dim]")
        derive[fact] = (where[0], int(where[1]))
    return Table(str(doc["name"]), str(doc.get("about", "")), dict(doc["config"]), dict(doc["facts"]), derive,
                 megatron, tuple(rules), source)


# -- rows ---------------------------------------------------------------------------------------


def _runs(rule: str, facts: Mapping[str, Any], megatron_rows: int, where: str) -> list[Run]:
    if rule == "all":
        return [Run(0, 0, megatron_rows)]
    if rule == "vocab":
        return [Run(0, 0, _fact(facts, "vocab", where))]
    if rule in ("gate", "up"):
        half = megatron_rows // 2
        return [Run(0 if rule == "gate" else half, 0, half)]
    heads, groups, hd = (_fact(facts, f, where) for f in ("heads", "groups", "head_dim"))
    if heads % groups:
        raise MappingError(f"{where}: {heads} attention heads do not split into {groups} query groups")
    per = heads // groups
    group_rows = (per + 2) * hd
    q = [Run(g * group_rows, g * per * hd, per * hd) for g in range(groups)]
    k = [Run(g * group_rows + per * hd, g * hd, hd) for g in range(groups)]
    v = [Run(g * group_rows + (per + 1) * hd, g * hd, hd) for g in range(groups)]
    if rule != "qkv":
        return {"q": q, "k": k, "v": v}[rule]
    return (q + [Run(r.start, heads * hd + r.file_start, r.count) for r in k]
            + [Run(r.start, (heads + groups) * hd + r.file_start, r.count) for r in v])


def _fact(facts: Mapping[str, Any], name: str, where: str) -> int:
    value = facts.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MappingError(f"{where}: needs the {name!r} size (a positive int in the config), got {value!r}")
    return value


def padded_rows(vocab: int, multiple: int, tp: int) -> int:
    """Megatron-LM's padded vocabulary: a multiple of `multiple` x TP."""
    step = multiple * tp
    return -(-vocab // step) * step


def _facts_of(table: Table, config: Mapping[str, Any]) -> dict[str, Any]:
    facts = {name: config[field] for name, field in table.facts.items() if field in config and config[field] is not None}
    if "hidden" in facts and "heads" in facts:
        facts.setdefault("head_dim", facts["hidden"] // facts["heads"])
    if "heads" in facts:
        facts.setdefault("groups", facts["heads"])
    return facts


# -- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfExport:
    config: dict[str, Any]
    tensors: tuple[ExportTensor, ...]


def _stored_key(spec: MegatronSpec, stored: Mapping[str, Any]) -> str | None:
    return next((k for k in (spec.key, *spec.aliases) if k in stored), None)


def export_config(table: Table, module: str, entry: ModuleEntry, *given: Mapping[str, Any]) -> dict[str, Any]:
    """config.json: the table's, then what stored shapes say, then each of `given` in turn (the
    config recorded at import, the user's), later ones winning."""
    derived: dict[str, Any] = {}
    for fact, (key, dim) in table.derive.items():
        stored = _stored_key(table.megatron[key], entry.tensors)
        if stored is not None and dim < len(entry.tensors[stored].global_shape):
            derived[table.facts[fact]] = entry.tensors[stored].global_shape[dim]
    for spec in table.megatron.values():
        if spec.unless and spec.unless in table.facts:
            derived[table.facts[spec.unless]] = _stored_key(spec, entry.tensors) is None
    dtypes = sorted({entry.tensors[k].dtype for spec in table.megatron.values()
                     if (k := _stored_key(spec, entry.tensors)) is not None})
    if dtypes:
        derived["torch_dtype"] = _TORCH_DTYPE.get(dtypes[0], "float32")
    config = {**table.config, **derived}
    for g in given:
        config.update(g)
    groups_field = table.facts.get("groups")
    if groups_field and groups_field not in config:
        groups = _groups_from_qkv(table, module, entry, _facts_of(table, config))
        if groups is not None:
            config[groups_field] = groups
    return config


def _groups_from_qkv(table: Table, module: str, entry: ModuleEntry, facts: Mapping[str, Any]) -> int | None:
    """Query groups from the fused QKV's rows: (heads + 2 groups) x head_dim."""
    rule = next((r for r in table.tensors if r.rows in ("q", "k", "v", "qkv")), None)
    key = _stored_key(table.megatron[rule.megatron], entry.tensors) if rule else None
    if key is None or "heads" not in facts or "head_dim" not in facts:
        return None
    rows = entry.tensors[key].global_shape[1 if table.megatron[rule.megatron].layers else 0]
    groups, rest = divmod(rows // facts["head_dim"] - facts["heads"], 2)
    if rest or groups <= 0 or rows % facts["head_dim"]:
        raise MappingError(f"module {module!r}: fused QKV {key!r} has {rows} rows, which is not "
                           f"(heads + 2 x groups) x head_dim for {facts['heads']} heads of {facts['head_dim']}")
    return groups


_TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def plan_hf_export(table: Table, module: str, entry: ModuleEntry, config: Mapping[str, Any]) -> HfExport:
    """Every Hugging Face tensor the table makes from `module`'s stored weights. Refuses a stored
    model tensor that no table entry covers (optimizer state aside): an export never drops a
    weight silently."""
    facts = _facts_of(table, config)
    by_hf: dict[str, list[ExportPart]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    rules: dict[str, TensorRule] = {}
    used: set[str] = set()
    layers = facts.get("layers")
    for rule in table.tensors:
        spec = table.megatron[rule.megatron]
        key = _stored_key(spec, entry.tensors)
        if key is None:
            if spec.unless and facts.get(spec.unless):
                continue
            names = " or ".join(repr(k) for k in (spec.key, *spec.aliases))
            raise MappingError(f"module {module!r}: tensor {names} is not in the checkpoint; table "
                               f"{table.name!r} makes {rule.hf!r} from it")
        used.add(key)
        stored = entry.tensors[key]
        shape = stored.global_shape
        if spec.layers:
            if layers is not None and shape[0] != layers:
                raise MappingError(f"module {module!r}: {key!r} holds {shape[0]} layers, the config says {layers}")
            shape = shape[1:]
        where = f"module {module!r}, tensor {key!r} -> {rule.hf!r}"
        runs = _runs(rule.rows, facts, shape[0], where)
        if rule.rows == "vocab" and runs[0].count > shape[0]:
            raise MappingError(f"{where}: vocab_size {runs[0].count} is more than the {shape[0]} stored rows")
        for layer in (range(stored.global_shape[0]) if spec.layers else [None]):
            name = rule.hf.replace(_LAYER, str(layer)) if layer is not None else rule.hf
            by_hf.setdefault(name, []).extend(ExportPart(key, layer, r) for r in runs)
            shapes[name], rules[name] = shape, rule
    unmapped = sorted(k for k in entry.tensors if k not in used and not k.startswith("optimizer."))
    if unmapped:
        raise MappingError(f"module {module!r}: table {table.name!r} maps no Hugging Face tensor from "
                           f"{unmapped[:6]}{' and more' if len(unmapped) > 6 else ''}; extend the table "
                           f"({table.source}) or exclude them")
    tensors = []
    for name, parts in by_hf.items():
        parts.sort(key=lambda p: p.run.file_start)
        rows = sum(p.run.count for p in parts)
        _check_cover(name, [(p.run.file_start, p.run.count) for p in parts], rows)
        shape = (rows, *shapes[name][1:])
        if rules[name].transpose:
            if len(shape) != 2:
                raise MappingError(f"{name!r}: only 2-D tensors transpose; it has shape {list(shape)}")
            shape = shape[::-1]
        tensors.append(ExportTensor(name, entry.tensors[parts[0].key].dtype, shape, rules[name].transpose, tuple(parts)))
    return HfExport(dict(config), tuple(tensors))


def _check_cover(what: str, spans: list[tuple[int, int]], total: int) -> None:
    pos = 0
    for start, count in sorted(spans):
        if start != pos:
            raise MappingError(f"{what}: rows {min(start, pos)}..{max(start, pos)} are "
                               f"{'covered twice' if start < pos else 'not covered'} by the table's rules")
        pos += count
    if pos != total:
        raise MappingError(f"{what}: the table's rules cover {pos} of {total} rows")


# -- import -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MegatronPart:
    """Rows `run.start..` of one layer of a megatron tensor come from Hugging Face tensor `hf`."""

    hf: str
    run: Run
    transpose: bool


@dataclass(frozen=True)
class MegatronTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    """Global shape: [layers, rows, ...] for stacked tensors, else [rows, ...]."""
    split: SplitSpec
    stacked: bool
    layers: tuple[tuple[MegatronPart, ...], ...]
    """Per layer (one entry for an unstacked tensor), parts in row order; rows no part covers are
    vocabulary padding (zeros)."""



def plan_hf_import(table: Table, config: Mapping[str, Any], headers: Mapping[str, tuple[str, tuple[int, ...]]], *,
                   tp: int, vocab_multiple: int, ignore: str | None = None) -> dict[str, MegatronTensor]:
    """Each megatron tensor of the module, built from Hugging Face tensors `headers` (name ->
    (dtype, shape)), with rows padded for a layout of tensor parallelism `tp`. Refuses a folder
    tensor no rule takes (unless it matches the regex `ignore`) and a rule without its tensor."""
    config = {**table.config, **config}
    facts = _facts_of(table, config)
    layers = _fact(facts, "layers", f"table {table.name!r}") if any(s.layers for s in table.megatron.values()) else 0
    parts: dict[str, list[list[MegatronPart]]] = {}
    dims: dict[str, tuple[str, tuple[int, ...]]] = {}  # megatron key -> (dtype, per-layer shape past rows)
    rows_of: dict[str, int] = {}
    taken: set[str] = set()
    for rule in table.tensors:
        spec = table.megatron[rule.megatron]
        if spec.unless and facts.get(spec.unless):
            continue
        for layer in (range(layers) if spec.layers else [None]):
            name = rule.hf.replace(_LAYER, str(layer)) if layer is not None else rule.hf
            if name not in headers:
                raise MappingError(f"the Hugging Face folder has no tensor {name!r} (table {table.name!r} makes "
                                   f"megatron {spec.key!r} from it)")
            taken.add(name)
            dtype, shape = headers[name]
            if rule.transpose:
                if len(shape) != 2:
                    raise MappingError(f"{name!r}: only 2-D tensors transpose; it has shape {list(shape)}")
                shape = shape[::-1]
            where = f"Hugging Face tensor {name!r} -> megatron {spec.key!r}"
            rows = {"gate": 2 * shape[0], "up": 2 * shape[0]}.get(rule.rows, shape[0])
            runs = _runs(rule.rows, facts, rows, where)
            if sum(r.count for r in runs) != shape[0]:
                raise MappingError(f"{where}: {shape[0]} rows, the config's sizes give {sum(r.count for r in runs)}")
            known = dims.setdefault(spec.key, (dtype, tuple(shape[1:])))
            if known != (dtype, tuple(shape[1:])):
                raise MappingError(f"{where}: {dtype} {list(shape)} does not fit the other parts "
                                   f"({known[0]}, rows of {list(known[1])})")
            slots = parts.setdefault(spec.key, [[] for _ in range(layers if spec.layers else 1)])
            slots[layer or 0].extend(MegatronPart(name, r, rule.transpose) for r in runs)
            rows_of[spec.key] = max(rows_of.get(spec.key, 0), max(r.start + r.count for r in runs))
    extra = sorted(n for n in headers if n not in taken and not (ignore and re.search(ignore, n)))
    if extra:
        raise MappingError(f"table {table.name!r} takes no megatron tensor from Hugging Face tensor(s) "
                           f"{extra[:6]}{' and more' if len(extra) > 6 else ''}; extend the table or ignore them")
    out = {}
    for key, per_layer in parts.items():
        spec = table.megatron[key]
        rows = padded_rows(rows_of[key], vocab_multiple, tp) if spec.vocab else rows_of[key]
        for i, layer_parts in enumerate(per_layer):
            layer_parts.sort(key=lambda p: p.run.start)
            covered = [(p.run.start, p.run.count) for p in layer_parts]
            _check_cover(f"megatron {key!r}" + (f" layer {i}" if spec.layers else ""), covered, rows_of[key])
        dtype, rest = dims[key]
        per_layer_shape = (rows, *rest)
        split: list[tuple[str, ...]] = [() for _ in per_layer_shape]
        if spec.tp is not None:
            split[spec.tp] = ("tp",)
        if spec.layers:
            shape, split = (layers, *per_layer_shape), [("pp",), *split]
        else:
            shape = per_layer_shape
        out[key] = MegatronTensor(key, dtype, shape, tuple(split), spec.layers, tuple(tuple(p) for p in per_layer))
    return out


def check_layout_fits(tensors: Mapping[str, MegatronTensor], tp: int, pp: int) -> None:
    """Megatron builds tensor- and pipeline-parallel parts from equal pieces."""
    for t in tensors.values():
        for dim, (size, cut) in enumerate(zip(t.shape, t.split)):
            for p, parts in (("tp", tp), ("pp", pp)):
                if p in cut and size % parts:
                    raise MappingError(f"megatron {t.key!r}: dimension {dim} ({size}) does not split into "
                                       f"{p}={parts} equal parts")

