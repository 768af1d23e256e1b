"""Mapping tables between Hugging Face tensors and megatron tensors, read from JSON.

A table (`hf_tables/<name>.json`, or any JSON file of the same form) describes one module:

- `config`: the config.json fields an export starts from;
- `facts`: which config fields give the sizes the mapping needs (`hidden`, `heads`, `groups`,
  `head_dim`, `layers`, `ffn`, `vocab`, `tied`, `positions`);
- `derive`: facts an export reads off stored shapes (`[megatron key, dim]`);
- `megatron`: each megatron tensor: `layers` (stacked over layers on dim 0, megatron's
  `decoder.layers.*`), `lead` (that many leading dims of size 1 the Hugging Face tensor lacks),
  `tp` (the per-layer dim tensor parallelism cuts), `vocab` (rows padded to the vocabulary
  multiple), `aliases` (other spellings an export accepts: megatron's GPT layer specs key a
  layer's norms as fused into the next linear, `linear_qkv.layer_norm_weight`, its ViT local spec
  does not), `unless` (a fact under which the tensor does not exist: `tied` output embeddings);
- `tensors`: each Hugging Face tensor (`{layer}` in per-layer names) as rows of one megatron
  tensor chosen by `rows` (see interop.hf_map), `transpose` for Conv1D-style `[in, out]`
  weights; or, with `fill` and `like`, a tensor megatron does not have, written on export as a
  constant with the shape and dtype of tensor `like` (and dropped on import).

A composite table (`modules`) makes one Hugging Face model of several modules: each module maps
through a table of its own, its config nested under a field of the composite config, its tensor
names behind a prefix (LLaVA: the vision tower and projector, and the language model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from mimo_ckpt.errors import MappingError

__all__ = ["TABLES_DIR", "LAYER", "RULES", "MegatronSpec", "TensorRule", "Table", "ModulePart", "CompositeTable",
           "load_table", "table_names"]

TABLES_DIR = os.path.join(os.path.dirname(__file__), "hf_tables")
LAYER = "{layer}"
RULES = ("all", "q", "k", "v", "qkv", "gate", "up", "vocab")
FACTS = ("hidden", "heads", "groups", "head_dim", "layers", "ffn", "vocab", "tied", "positions")


@dataclass(frozen=True, slots=True)
class MegatronSpec:
    key: str
    aliases: tuple[str, ...] = ()
    layers: bool = False
    lead: int = 0
    tp: int | None = None
    vocab: bool = False
    unless: str | None = None

    @property
    def lead_dims(self) -> int:
        """Leading megatron dims before the Hugging Face tensor's own: the layer, or size-1 dims."""
        return 1 if self.layers else self.lead


@dataclass(frozen=True, slots=True)
class TensorRule:
    hf: str
    megatron: str | None
    rows: str = "all"
    transpose: bool = False
    fill: float | None = None
    like: str | None = None


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
    prefix: str = ""
    """Put before every Hugging Face name (the table's place in a composite model)."""

    def hf_name(self, rule: TensorRule, layer: int | None = None) -> str:
        return self.prefix + (rule.hf.replace(LAYER, str(layer)) if layer is not None else rule.hf)


@dataclass(frozen=True)
class ModulePart:
    table: Table
    config_field: str
    """The composite config's field holding this module's config (LLaVA's `vision_config`)."""


@dataclass(frozen=True)
class CompositeTable:
    name: str
    about: str
    config: Mapping[str, Any]
    modules: Mapping[str, ModulePart] = field(default_factory=dict)
    source: str = "<table>"


def table_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(TABLES_DIR) if f.endswith(".json"))


def load_table(name_or_path: str, base: str = TABLES_DIR) -> Table | CompositeTable:
    """A built-in table by name (`llama`, `gpt2`, `clip_vision`, `llava`) or a table file."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(TABLES_DIR, f"{name_or_path}.json")
    if not os.path.isabs(path) and name_or_path.endswith(".json") and not os.path.exists(path):
        path = os.path.join(base, path)
    if not os.path.isfile(path):
        raise MappingError(f"no mapping table {name_or_path!r}: give one of {table_names()} or a .json table file")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise MappingError(f"mapping table {path}: {exc}") from None
    if isinstance(doc, dict) and "modules" in doc:
        return _parse_composite(doc, path)
    return parse_table(doc, path)


def _checker(source: str) -> Any:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise MappingError(f"mapping table {source}: {what}")
    return need


def _parse_composite(doc: dict[str, Any], source: str) -> CompositeTable:
    need = _checker(source)
    need(isinstance(doc.get("config", {}), dict) and isinstance(doc["modules"], dict) and doc["modules"],
         "'config' must be an object and 'modules' a non-empty object")
    modules = {}
    for module, part in doc["modules"].items():
        need(isinstance(part, dict) and {"table", "config"} <= set(part) <= {"table", "config", "prefix"},
             f"module {module!r}: fields are table, config, prefix")
        table = load_table(part["table"], os.path.dirname(source))
        need(isinstance(table, Table), f"module {module!r}: table {part['table']!r} is itself composite")
        table = replace(table, prefix=str(part.get("prefix", "")))
        modules[module] = ModulePart(table, str(part["config"]))
    return CompositeTable(str(doc.get("name", "")), str(doc.get("about", "")), dict(doc.get("config", {})),
                          modules, source)


def parse_table(doc: Any, source: str = "<table>") -> Table:
    need = _checker(source)
    need(isinstance(doc, dict), "must be a JSON object")
    for name in ("name", "config", "facts", "megatron", "tensors"):
        need(name in doc, f"missing field {name!r}")
    need(isinstance(doc["config"], dict) and isinstance(doc["facts"], dict), "'config' and 'facts' must be objects")
    unknown = sorted(set(doc["facts"]) - set(FACTS))
    need(not unknown, f"unknown facts {unknown} (known: {list(FACTS)})")
    megatron = {}
    for key, spec in doc["megatron"].items():
        need(isinstance(spec, dict) and set(spec) <= {"layers", "lead", "tp", "vocab", "aliases", "unless"},
             f"megatron tensor {key!r}: fields are layers, lead, tp, vocab, aliases, unless")
        need(not (spec.get("layers") and spec.get("lead")), f"megatron tensor {key!r}: layers or lead, not both")
        megatron[key] = MegatronSpec(key, tuple(spec.get("aliases", ())), bool(spec.get("layers", False)),
                                     int(spec.get("lead", 0)), spec.get("tp"), bool(spec.get("vocab", False)),
                                     spec.get("unless"))
    rules = []
    names = {t.get("hf") for t in doc["tensors"] if isinstance(t, dict)}
    for t in doc["tensors"]:
        need(isinstance(t, dict) and "hf" in t, f"tensor entry {t!r}: needs hf")
        if "fill" in t:
            need(set(t) == {"hf", "fill", "like"} and isinstance(t["fill"], (int, float)) and t["like"] in names,
                 f"tensor {t['hf']!r}: a constant is {{hf, fill (a number), like (another hf tensor)}}")
            rules.append(TensorRule(t["hf"], None, fill=float(t["fill"]), like=t["like"]))
            continue
        need("megatron" in t and set(t) <= {"hf", "megatron", "rows", "transpose"},
             f"tensor entry {t!r}: fields are hf, megatron, rows, transpose (or hf, fill, like)")
        rule = TensorRule(t["hf"], t["megatron"], t.get("rows", "all"), bool(t.get("transpose", False)))
        need(rule.rows in RULES, f"tensor {rule.hf!r}: rows {rule.rows!r} is not one of {list(RULES)}")
        need(rule.megatron in megatron, f"tensor {rule.hf!r}: megatron tensor {rule.megatron!r} is not in 'megatron'")
        need((LAYER in rule.hf) == megatron[rule.megatron].layers,
             f"tensor {rule.hf!r}: '{LAYER}' must appear exactly where the megatron tensor is stacked over layers")
        rules.append(rule)
    hf_names = [r.hf for r in rules]
    need(len(set(hf_names)) == len(hf_names), "a Hugging Face tensor is named twice")
    derive = {}
    for fact, where in doc.get("derive", {}).items():
        need(fact in FACTS and isinstance(where, list) and len(where) == 2 and where[0] in megatron,
             f"derive {fact!r}: must be [megatron tensor of the table, dim]")
        derive[fact] = (where[0], int(where[1]))
    return Table(str(doc["name"]), str(doc.get("about", "")), dict(doc["config"]), dict(doc["facts"]), derive,
                 megatron, tuple(rules), source)
