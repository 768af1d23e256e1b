"""Hugging Face <-> megatron tensor mapping, planned from the tables of interop.hf_table (pure).

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

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from mimo_ckpt.errors import MappingError
from mimo_ckpt.format.manifest import ModuleEntry
from mimo_ckpt.interop.hf_table import CompositeTable, MegatronSpec, Table, TensorRule
from mimo_ckpt.interop.megatron_keys import OPTIMIZER_STATE
from mimo_ckpt.model.dtypes import TORCH_NAMES
from mimo_ckpt.model.split import SplitSpec
from mimo_ckpt.plan.export import ExportPart, ExportTensor, Run

__all__ = [
    "MegatronPart", "MegatronTensor", "ImportPlan", "export_config", "composite_export_config",
    "plan_hf_export", "optimizer_states", "plan_hf_import", "check_all_taken", "check_layout_fits", "padded_rows",
    "merge_config",
]


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


def _stored_key(spec: MegatronSpec, stored: Mapping[str, Any]) -> str | None:
    return next((k for k in (spec.key, *spec.aliases) if k in stored), None)


def merge_config(base: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with each override applied in turn; nested objects merge field by field."""
    out = dict(base)
    for o in overrides:
        for k, v in o.items():
            out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
        derived["dtype"] = TORCH_NAMES[dtypes[0]] if dtypes[0] in _CONFIG_DTYPES else "float32"
    config = merge_config(table.config, derived, *given)
    groups_field = table.facts.get("groups")
    if groups_field and groups_field not in config:
        groups = _groups_from_qkv(table, module, entry, _facts_of(table, config))
        if groups is not None:
            config[groups_field] = groups
    return config


def composite_export_config(table: CompositeTable, entries: Mapping[str, ModuleEntry],
                            *given: Mapping[str, Any]) -> dict[str, Any]:
    """A composite model's config.json: each module's config, as `export_config` makes it, under
    its field; then each of `given` (whole composite configs) in turn."""
    config = merge_config(table.config, *given)
    for module, part in table.modules.items():
        sub = [g[part.config_field] for g in given if isinstance(g.get(part.config_field), dict)]
        config[part.config_field] = export_config(part.table, module, entries[module], *sub)
    return config


def _groups_from_qkv(table: Table, module: str, entry: ModuleEntry, facts: Mapping[str, Any]) -> int | None:
    """Query groups from the fused QKV's rows: (heads + 2 groups) x head_dim."""
    rule = next((r for r in table.tensors if r.rows in ("q", "k", "v", "qkv")), None)
    spec = table.megatron[rule.megatron] if rule and rule.megatron else None
    key = _stored_key(spec, entry.tensors) if spec else None
    if spec is None or key is None or "heads" not in facts or "head_dim" not in facts:
        return None
    rows = entry.tensors[key].global_shape[spec.lead_dims]
    groups, rest = divmod(rows // facts["head_dim"] - facts["heads"], 2)
    if rest or groups <= 0 or rows % facts["head_dim"]:
        raise MappingError(f"module {module!r}: fused QKV {key!r} has {rows} rows, which is not "
                           f"(heads + 2 x groups) x head_dim for {facts['heads']} heads of {facts['head_dim']}")
    return groups


_CONFIG_DTYPES = ("F64", "F32", "F16", "BF16")
"""Stored dtypes a config.json names by their torch name; any other is written as float32."""


def _leading_indexes(spec: MegatronSpec, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The index of each Hugging Face tensor in the megatron tensor's leading dims."""
    if spec.layers:
        return [(layer,) for layer in range(shape[0])]
    return [(0,) * spec.lead]


def optimizer_states(entry: ModuleEntry) -> list[str]:
    """The optimizer state names a module stores per weight (exp_avg, exp_avg_sq, fp32_param)."""
    return sorted({k[len(OPTIMIZER_STATE):].split(".", 1)[0] for k in entry.tensors if k.startswith(OPTIMIZER_STATE)})


def plan_hf_export(table: Table, module: str, entry: ModuleEntry, config: Mapping[str, Any],
                   state: str | None = None) -> tuple[ExportTensor, ...]:
    """Every Hugging Face tensor the table makes from `module`'s stored weights. Refuses a stored
    model tensor that no table entry covers (optimizer state aside): an export never drops a
    weight silently. With `state`, the same tensors of that optimizer state instead
    (`optimizer.state.<state>.<weight key>`), named `optimizer.<state>.<Hugging Face name>`;
    weights without it (frozen ones) are left out."""
    if state is not None:
        prefix = f"{OPTIMIZER_STATE}{state}."
        view = ModuleEntry(entry.layout, {k[len(prefix):]: t for k, t in entry.tensors.items() if k.startswith(prefix)},
                           {})
        renamed = []
        for t in _plan_export(table, module, view, config, optional=True):
            if t.fill is None:
                parts = tuple(ExportPart(p.module, prefix + p.key, p.index, p.run) for p in t.parts)
                renamed.append(ExportTensor(f"optimizer.{state}.{t.name}", t.dtype, t.shape, t.transpose, parts))
        return tuple(renamed)
    return _plan_export(table, module, entry, config, optional=False)


def _plan_export(table: Table, module: str, entry: ModuleEntry, config: Mapping[str, Any],
                 optional: bool) -> tuple[ExportTensor, ...]:
    facts = _facts_of(table, config)
    by_hf: dict[str, list[ExportPart]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    rules: dict[str, TensorRule] = {}
    used: set[str] = set()
    layers = facts.get("layers")
    for rule in table.tensors:
        if rule.megatron is None:
            continue
        spec = table.megatron[rule.megatron]
        key = _stored_key(spec, entry.tensors)
        if key is None:
            if optional or (spec.unless and facts.get(spec.unless)):
                continue
            names = " or ".join(repr(k) for k in (spec.key, *spec.aliases))
            raise MappingError(f"module {module!r}: tensor {names} is not in the checkpoint; table "
                               f"{table.name!r} makes {table.hf_name(rule)!r} from it")
        used.add(key)
        stored = entry.tensors[key]
        if spec.layers and layers is not None and stored.global_shape[0] != layers:
            raise MappingError(f"module {module!r}: {key!r} holds {stored.global_shape[0]} layers, "
                               f"the config says {layers}")
        if any(d != 1 for d in stored.global_shape[:spec.lead]) or len(stored.global_shape) <= spec.lead_dims:
            raise MappingError(f"module {module!r}: {key!r} has shape {list(stored.global_shape)}; table "
                               f"{table.name!r} expects {spec.lead_dims} leading dims before the rows")
        shape = stored.global_shape[spec.lead_dims:]
        where = f"module {module!r}, tensor {key!r} -> {table.hf_name(rule)!r}"
        runs = _runs(rule.rows, facts, shape[0], where)
        if rule.rows == "vocab" and runs[0].count > shape[0]:
            raise MappingError(f"{where}: vocab_size {runs[0].count} is more than the {shape[0]} stored rows")
        for index in _leading_indexes(spec, stored.global_shape):
            name = table.hf_name(rule, index[0] if spec.layers else None)
            by_hf.setdefault(name, []).extend(ExportPart(module, key, index, r) for r in runs)
            shapes[name], rules[name] = shape, rule
    unmapped = sorted(k for k in entry.tensors if k not in used and not k.startswith("optimizer."))
    if unmapped and not optional:
        raise MappingError(f"module {module!r}: table {table.name!r} maps no Hugging Face tensor from "
                           f"{unmapped[:6]}{' and more' if len(unmapped) > 6 else ''}; extend the table "
                           f"({table.source}) or exclude them")
    tensors = {}
    for name, parts in by_hf.items():
        parts.sort(key=lambda p: p.run.file_start)
        rows = sum(p.run.count for p in parts)
        _check_cover(name, [(p.run.file_start, p.run.count) for p in parts], rows)
        shape = (rows, *shapes[name][1:])
        if rules[name].transpose:
            if len(shape) != 2:
                raise MappingError(f"{name!r}: only 2-D tensors transpose; it has shape {list(shape)}")
            shape = shape[::-1]
        tensors[name] = ExportTensor(name, entry.tensors[parts[0].key].dtype, shape, rules[name].transpose,
                                     tuple(parts))
    for rule in table.tensors:
        if rule.fill is not None:
            like = tensors.get(table.prefix + rule.like)
            if like is not None:
                name = table.hf_name(rule)
                tensors[name] = ExportTensor(name, like.dtype, like.shape, False, (), fill=rule.fill)
    return tuple(tensors.values())


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
    """Global shape: [leading dims (the layer, or dims of size 1), rows, ...]."""
    split: SplitSpec
    lead: int
    """How many leading dims come before the rows."""
    stacked: bool
    """Whether the leading dim is the layer."""
    slots: tuple[tuple[MegatronPart, ...], ...]
    """Per layer (one slot for an unstacked tensor), parts in row order; rows no part covers are
    vocabulary padding (zeros)."""


@dataclass(frozen=True)
class ImportPlan:
    tensors: dict[str, MegatronTensor]
    taken: frozenset[str]
    """The folder tensors the plan reads or drops (constants megatron does not have)."""


def plan_hf_import(table: Table, config: Mapping[str, Any], headers: Mapping[str, tuple[str, tuple[int, ...]]], *,
                   tp: int, vocab_multiple: int) -> ImportPlan:
    """Each megatron tensor of the module, built from Hugging Face tensors `headers` (name ->
    (dtype, shape)), with rows padded for a layout of tensor parallelism `tp`. Refuses a rule
    whose tensor the folder lacks."""
    config = merge_config(table.config, config)
    facts = _facts_of(table, config)
    layers = _fact(facts, "layers", f"table {table.name!r}") if any(s.layers for s in table.megatron.values()) else 0
    if any(r.rows in ("q", "k", "v", "qkv") for r in table.tensors) and facts.get("groups", 1) % tp:
        raise MappingError(f"table {table.name!r}: megatron splits attention by query group, and the "
                           f"{facts['groups']} groups of this model do not divide by tp={tp}")
    parts: dict[str, list[list[MegatronPart]]] = {}
    dims: dict[str, tuple[str, tuple[int, ...]]] = {}  # megatron key -> (dtype, per-layer shape past rows)
    rows_of: dict[str, int] = {}
    taken = {table.hf_name(r) for r in table.tensors if r.fill is not None and table.hf_name(r) in headers}
    for rule in table.tensors:
        if rule.megatron is None:
            continue
        spec = table.megatron[rule.megatron]
        if spec.unless and facts.get(spec.unless):
            continue
        for layer in (range(layers) if spec.layers else [None]):
            name = table.hf_name(rule, layer)
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
    out = {}
    for key, per_slot in parts.items():
        spec = table.megatron[key]
        rows = padded_rows(rows_of[key], vocab_multiple, tp) if spec.vocab else rows_of[key]
        for i, slot in enumerate(per_slot):
            slot.sort(key=lambda p: p.run.start)
            covered = [(p.run.start, p.run.count) for p in slot]
            _check_cover(f"megatron {key!r}" + (f" layer {i}" if spec.layers else ""), covered, rows_of[key])
        dtype, rest = dims[key]
        own_shape = (rows, *rest)
        split: list[tuple[str, ...]] = [() for _ in own_shape]
        if spec.tp is not None:
            split[spec.tp] = ("tp",)
        lead_shape, lead_split = ((layers,), [("pp",)]) if spec.layers else ((1,) * spec.lead, [()] * spec.lead)
        out[key] = MegatronTensor(key, dtype, (*lead_shape, *own_shape), tuple(lead_split + split), spec.lead_dims,
                                  spec.layers, tuple(tuple(p) for p in per_slot))
    return ImportPlan(out, frozenset(taken))


def check_all_taken(headers: Iterable[str], taken: Iterable[str], ignore: str | None, table: str) -> None:
    """Refuse a folder tensor no rule takes, unless it matches the regex `ignore`."""
    taken = set(taken)
    extra = sorted(n for n in headers if n not in taken and not (ignore and re.search(ignore, n)))
    if extra:
        raise MappingError(f"table {table!r} takes no megatron tensor from Hugging Face tensor(s) "
                           f"{extra[:6]}{' and more' if len(extra) > 6 else ''}; extend the table or ignore them")


def check_layout_fits(tensors: Mapping[str, MegatronTensor], tp: int, pp: int) -> None:
    """Megatron builds tensor- and pipeline-parallel parts from equal pieces."""
    for t in tensors.values():
        for dim, (size, cut) in enumerate(zip(t.shape, t.split)):
            for p, parts in (("tp", tp), ("pp", pp)):
                if p in cut and size % parts:
                    raise MappingError(f"megatron {t.key!r}: dimension {dim} ({size}) does not split into "
                                       f"{p}={parts} equal parts")
