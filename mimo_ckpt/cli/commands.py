"""The `mimo-ckpt` command line: inspect, verify, diff, reshard, export, import.

Works offline on CPU with no process group; never imports megatron-core, and imports torch only
for torch_dist import and export. Errors are one line on stderr with exit status 2 (1 means
"found a problem": a bad shard, a difference).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from typing import Any, NoReturn

from mimo_ckpt import __version__
from mimo_ckpt.io.commit import new_save_id
from mimo_ckpt.errors import LayoutError, MimoCkptError
from mimo_ckpt.format.manifest import Manifest
from mimo_ckpt.io.commit import read_manifest
from mimo_ckpt.io.progress import human_bytes
from mimo_ckpt.io.storage import open_storage
from mimo_ckpt.model.rank_state import RANK_STATE_PREFIX
from mimo_ckpt.cli.args import parse_layout_arg, parse_size

__all__ = ["main"]


def positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def regex(text: str) -> str:
    """A pattern checked here, so a bad one is a usage error rather than a failure mid-export."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {exc}") from None
    return text


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _spec_json(text: str) -> dict:
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of kvstore spec fields")
    return spec


def svg_path(text: str) -> str:
    if not text.endswith(".svg"):
        raise argparse.ArgumentTypeError(f"{text!r}: pictures are written as SVG; name the file *.svg")
    return text


def default_max_memory() -> int:
    """A sixteenth of physical memory, at least 256 MiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 << 30
    return max(total // 16, 256 << 20)


def _open(path: str) -> tuple[Any, Manifest]:
    storage = open_storage(path)
    return storage, read_manifest(storage, source=path)


def _modules(manifest: Manifest, wanted: list[str] | None) -> list[str]:
    for name in wanted or []:
        if name not in manifest.modules:
            raise LayoutError(f"module {name!r} is not in the checkpoint (it has {sorted(manifest.modules)})")
    return wanted or sorted(manifest.modules)


# --- inspect -------------------------------------------------------------------------------------


def _summary(manifest: Manifest, modules: list[str]) -> dict:
    out = {}
    for name in modules:
        entry = manifest.modules[name]
        layout = entry.layout
        out[name] = {
            "layout": layout.to_json(),
            "ranks": [layout.rank_offset, layout.rank_offset + layout.size - 1],
            "bytes": entry.nbytes,
            "tensors": {
                key: {"dtype": t.dtype, "shape": list(t.global_shape), "shards": len(t.shards),
                      "bytes": t.nbytes}
                for key, t in sorted(entry.tensors.items())
            },
            "objects": sorted(entry.objects),
        }
    return {"version": manifest.version, "world_size": manifest.world_size,
            "metadata": dict(manifest.metadata), "modules": out}


def _tensor_values(storage: Any, manifest: Manifest, modules: list[str], key: str, args: argparse.Namespace) -> dict:
    from mimo_ckpt.io.stream import Budget, iter_box
    from mimo_ckpt.format.values import Summary, as_float64

    hits = [(m, manifest.modules[m].tensors[key]) for m in modules if key in manifest.modules[m].tensors]
    if not hits:
        raise LayoutError(f"tensor {key!r} is not in module(s) {modules}")
    module, stored = hits[0]
    summary = Summary()
    budget = Budget(args.chunk // 2, args.chunk // 2)
    for shard in stored.shards:
        for _, raw in iter_box(storage, module, key, stored, shard.box, budget):
            summary.add(as_float64(raw, stored.dtype))
    return {"module": module, "key": key, "dtype": stored.dtype, "shape": list(stored.global_shape),
            "shards": [{"box": str(s.box), "file": s.file} for s in stored.shards], **summary.to_json()}


def _inspect(args: argparse.Namespace) -> int:
    storage, manifest = _open(args.ckpt)
    modules = _modules(manifest, args.module)
    if args.picture:
        from mimo_ckpt.offline.picture import write_picture

        write_picture(manifest, modules, args.picture, key=args.tensor)
        print(f"wrote {args.picture}", file=sys.stderr)
    if args.tensor:
        values = _tensor_values(storage, manifest, modules, args.tensor, args)
        if args.json:
            print(json.dumps(values, indent=1))
        else:
            print(f"module {values['module']}, tensor {values['key']}: {values['dtype']} {values['shape']}, "
                  f"{plural(len(values['shards']), 'shard')}")
            for k in ("count", "min", "max", "mean", "norm", "nan", "inf"):
                print(f"  {k:<5} {values[k]}")
        return 0
    if args.object:
        return _print_object(manifest, modules, args.object, args.json)
    summary = _summary(manifest, modules)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{args.ckpt}: format v{summary['version']}, saved by {plural(summary['world_size'], 'rank')}")
    if summary["metadata"]:
        print(f"metadata: {json.dumps(summary['metadata'])}")
    for name in modules:
        _print_module(name, manifest.modules[name])
    return 0


_GROUPS = (("model", ""), ("optimizer", "optimizer."), ("rank-bound state", RANK_STATE_PREFIX))
"""How inspect groups a module's keys: by prefix, the first that matches from the end."""


def _group(key: str) -> str:
    return next(name for name, prefix in reversed(_GROUPS) if key.startswith(prefix))


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print_module(name: str, entry: Any) -> None:
    print(f"\nmodule {name} {entry.layout.describe()}: {plural(len(entry.tensors), 'tensor')}, "
          f"{human_bytes(entry.nbytes)}; {plural(len(entry.objects), 'object')}")
    width = max((len(k) for k in (*entry.tensors, *entry.objects)), default=3)
    for group, _ in _GROUPS:
        tensors = sorted(k for k in entry.tensors if _group(k) == group)
        objects = sorted(k for k in entry.objects if _group(k) == group)
        if not tensors and not objects:
            continue
        size = sum(entry.tensors[k].nbytes for k in tensors)
        counts = ([f"{plural(len(tensors), 'tensor')}, {human_bytes(size)}"] if tensors else []) + (
            [plural(len(objects), "object")] if objects else [])
        print(f"  {group}: {'; '.join(counts)}")
        for key in tensors:
            t = entry.tensors[key]
            print(f"    {key:<{width}}  {t.dtype:<7} {str(list(t.global_shape)):<20} {human_bytes(t.nbytes):>10}  "
                  f"{plural(len(t.shards), 'shard')}")
        for key in objects:
            o = entry.objects[key]
            grid = f"one per rank of {list(o.global_shape)}" if o.global_shape and o.global_shape != (1,) else "one value"
            print(f"    {key:<{width}}  object  {grid}")


def _print_object(manifest: Manifest, modules: list[str], key: str, as_json: bool) -> int:
    """An object's stored value(s), as encoded in the manifest (tagged JSON: docs/format.md)."""
    hits = {m: manifest.modules[m].objects[key] for m in modules if key in manifest.modules[m].objects}
    if not hits:
        raise LayoutError(f"no object {key!r} in module(s) {modules}")
    out = {m: {",".join(map(str, offset)) or "-": value for offset, value in sorted(o.values.items())}
           for m, o in hits.items()}
    if as_json:
        print(json.dumps(out, indent=1))
        return 0
    for m, values in out.items():
        for offset, value in values.items():
            where = f" at {offset}" if offset != "-" else ""
            print(f"module {m}, object {key}{where}: {json.dumps(value)}")
    return 0


# --- verify / diff -------------------------------------------------------------------------------


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def _verify(args: argparse.Namespace) -> int:
    from mimo_ckpt.offline.verify import verify_checkpoint

    storage, manifest = _open(args.ckpt)
    bad = verify_checkpoint(storage, manifest, chunk_bytes=args.chunk, progress=_progress(args),
                            modules=_modules(manifest, args.module))
    for b in bad:
        print(f"BAD {b}")
    shards = sum(len(t.shards) for m in manifest.modules.values() for t in m.tensors.values())
    print(f"{'FAILED' if bad else 'OK'}: {len(bad)} bad of {plural(shards, 'shard')} checked")
    return 1 if bad else 0


def _diff(args: argparse.Namespace) -> int:
    from mimo_ckpt.offline.diff import diff_checkpoints
    from mimo_ckpt.io.stream import Budget

    sa, ma = _open(args.a)
    sb, mb = _open(args.b)
    found = diff_checkpoints(sa, ma, sb, mb, budget=Budget(args.chunk // 2, args.chunk // 2),
                             progress=_progress(args), modules=args.module)
    changed = [d for d in found if d.status != "identical"]
    if args.json:
        print(json.dumps([d.to_json() for d in found], indent=1))
    else:
        for d in found:
            if d.status == "identical" and not args.all:
                continue
            extra = ""
            if d.status == "different" and d.kind == "tensor":
                extra = f": max abs diff {d.max_abs_diff:.6g}, {d.elements_differing} elements differ"
            print(f"{d.module} {d.kind} {d.key}: {d.status}{extra}")
        print(f"{'DIFFERENT' if changed else 'IDENTICAL'}: {len(changed)} of {len(found)} entries differ")
    return 1 if changed else 0


# --- reshard / export ----------------------------------------------------------------------------


def _budget(args: argparse.Namespace, workers: int = 1) -> Any:
    from mimo_ckpt.io.stream import Budget

    try:
        return Budget.from_cap(args.max_memory, workers)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None


def _reshard(args: argparse.Namespace) -> int:
    from mimo_ckpt.offline.reshard import plan_reshard, run_reshard

    _, manifest = _open(args.src)
    layouts = {}
    for text in args.module:
        name = text.partition("=")[0]
        if name in layouts:  # keeping either one silently would reshard to a layout not asked for
            raise LayoutError(f"--module {name!r} is given more than once; give each module's layout once")
        old = manifest.modules[name].layout if name in manifest.modules else None
        name, layout = parse_layout_arg(text, old)
        layouts[name] = layout
    save_id = new_save_id()  # names the new files, so no run can collide with the files of another
    plans = plan_reshard(manifest, layouts, file_tag=save_id, allow_uneven=args.allow_uneven)
    for name, p in plans.items():
        print(f"module {name}: {p.old.describe()} -> {p.new.describe()}: read {human_bytes(p.read_bytes)}, "
              f"write {human_bytes(p.write_bytes)} in {len(p.plan.files)} files")
        for key in p.dropped_objects:
            print(f"  drops layout-bound object {key!r} (per-rank state of the old layout)")
    kept = [n for n in sorted(manifest.modules) if n not in plans]
    if kept:
        print(f"unchanged, files shared with SRC: {', '.join(kept)}")
    if args.dry_run:
        return 0
    budget = _budget(args, args.workers)
    run_reshard(args.src, args.dst, manifest, plans, budget=budget, workers=args.workers, progress=_progress(args),
                save_id=save_id)
    print(f"wrote {args.dst}")
    return 0


def _compose(args: argparse.Namespace) -> int:
    from mimo_ckpt.offline.compose import ModuleSource

    sources = []
    for text in args.module:
        name, sep, url = text.partition("=")
        if not sep or not name or not url:
            raise LayoutError(f"--module {text!r}: expected NAME=SRC (the module NAME of checkpoint SRC)")
        sources.append(ModuleSource(name, url))
    return _write_composed(sources, args)


def _split(args: argparse.Namespace) -> int:
    from mimo_ckpt.offline.compose import ModuleSource

    return _write_composed([ModuleSource(name, args.src) for name in args.module], args)


def _write_composed(sources: list[Any], args: argparse.Namespace) -> int:
    from mimo_ckpt.offline.compose import run_compose

    manifest = run_compose(sources, args.dst, budget=_budget(args), progress=_progress(args))
    for src in sources:
        entry = manifest.modules[src.module]
        print(f"module {src.module}: {entry.layout.describe()}, {human_bytes(entry.nbytes)} from {src.url}")
    print(f"wrote {args.dst}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "torch_dist":
        return _export_torch_dist(args)
    if args.format == "hf":
        return _export_hf(args)
    if not args.module or len(args.module) != 1:
        raise LayoutError("--format safetensors exports one module: give exactly one --module")
    from mimo_ckpt.io.storage import LocalStorage
    from mimo_ckpt.offline.export import run_export
    from mimo_ckpt.plan.export import plain_tensors, plan_export_files

    storage, manifest = _open(args.src)
    [module] = _modules(manifest, args.module)
    rename = {}
    if args.rename:
        with open(args.rename) as f:
            rename = json.load(f)
        if not isinstance(rename, dict) or not all(isinstance(v, str) for v in rename.values()):
            raise LayoutError(f"--rename {args.rename}: must be a JSON object mapping old key to new key")
    tensors = plain_tensors(module, manifest.modules[module], rename=rename, include=args.include, exclude=args.exclude)
    files = plan_export_files(tensors, args.max_shard_size)
    os.makedirs(args.to, exist_ok=True)
    index = run_export(storage, LocalStorage(args.to), {module: manifest.modules[module]}, files,
                       _budget(args), progress=_progress(args), where=args.to)
    print(f"exported {len(index['weight_map'])} tensors, {human_bytes(index['metadata']['total_size'])} "
          f"in {len(files)} files to {args.to}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from mimo_ckpt.interop.hf import export_hf

    for option in ("rename", "include", "exclude"):
        if getattr(args, option):
            raise LayoutError(f"--{option} applies to --format safetensors; --format hf maps names by its table")
    os.makedirs(args.to, exist_ok=True)
    config = export_hf(args.src, args.to, args.module, table=args.table, config=_config_fields(args),
                       optimizer=args.optimizer, max_shard_bytes=args.max_shard_size, budget=_budget(args),
                       progress=_progress(args))
    what = ", ".join(args.module) if args.module else "the table's modules"
    print(f"exported {what} as {config.get('architectures', ['?'])[0]} to {args.to}")
    return 0


def _config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """--config FILE, then each --set FIELD=VALUE (VALUE as JSON where it parses, else text)."""
    fields: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                fields = json.load(f)
        except (OSError, ValueError) as exc:
            raise LayoutError(f"--config {args.config}: {exc}") from None
        if not isinstance(fields, dict):
            raise LayoutError(f"--config {args.config}: must be a JSON object of config.json fields")
    for item in args.set or ():
        field, sep, text = item.partition("=")
        if not sep or not field or "" in field.split("."):
            raise LayoutError(f"--set {item!r}: expected FIELD=VALUE (FIELD may be nested: text_config.vocab_size)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *outer, last = field.split(".")
        place = fields
        for name in outer:
            place = place.setdefault(name, {})
            if not isinstance(place, dict):
                raise LayoutError(f"--set {item!r}: {name} is not an object")
        place[last] = value
    return fields


def _export_torch_dist(args: argparse.Namespace) -> int:
    from mimo_ckpt.interop.torch_dist import export_torch_dist  # imports torch

    counts = export_torch_dist(args.src, args.to, modules=args.module, main_param_name=args.main_param_name,
                               progress=_progress(args))
    print(f"exported {counts['tensors']} tensors ({human_bytes(counts['bytes'])}) and {counts['objects']} objects "
          f"as megatron torch_dist to {args.to}"
          + (f"; skipped {counts['skipped_layout_bound']} layout-bound objects" if counts["skipped_layout_bound"] else ""))
    return 0


def _import(args: argparse.Namespace) -> int:
    if args.format == "hf":
        return _import_hf(args)
    from mimo_ckpt.interop.torch_dist import import_torch_dist  # imports torch

    report = import_torch_dist(args.src, args.dst, allow_pickle=args.allow_pickle, progress=_progress(args))
    for line in report.dropped:
        print(f"dropped {line}")
    print(f"imported {report.tensors} tensor chunks ({human_bytes(report.bytes)}) and {report.objects} objects "
          f"to {args.dst}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from mimo_ckpt.interop.hf import import_hf

    if not args.module:
        raise LayoutError("--format hf: give --module NAME=tp2,pp2,... for each module to write (its layout)")
    layouts = dict(parse_layout_arg(text, None) for text in args.module)
    if len(layouts) != len(args.module):
        raise LayoutError("--module: a module is named twice")
    manifest = import_hf(args.src, args.dst, layouts, table=args.table, vocab_multiple=args.vocab_multiple,
                         ignore=args.ignore, budget=_budget(args), progress=_progress(args))
    for name, entry in manifest.modules.items():
        print(f"imported module {name}: {len(entry.tensors)} tensors, {human_bytes(entry.nbytes)}, "
              f"laid out for {entry.layout.describe()}")
    print(f"wrote {args.dst}")
    return 0


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="mimo-ckpt", description="Inspect, verify, compare, reshard, compose, split, "
                                     "import and export mimo-ckpt checkpoints offline (no GPU, no process group).")
    parser.add_argument("--version", action="version", version=f"mimo-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
        p.add_argument("--storage-spec", metavar="JSON", type=_spec_json,
                       help="tensorstore kvstore spec fields for every URL with a scheme: endpoint, aws_region, "
                            "aws_credentials, context (e.g. {\"endpoint\": \"http://127.0.0.1:9000\"}); "
                            "the same as MIMO_CKPT_STORAGE_SPEC")
        p.add_argument("--chunk", type=parse_size, default=16 << 20, help=argparse.SUPPRESS)
        return p

    p = command("inspect", "modules, layouts, tensors and objects (manifest only, unless values are asked for)")
    p.add_argument("ckpt", help="checkpoint directory or tensorstore URL")
    p.add_argument("--module", action="append", help="only this module (repeatable)")
    p.add_argument("--tensor", metavar="KEY", help="summarise this tensor's values (min/max/mean/norm), box by box")
    p.add_argument("--object", metavar="KEY", help="show this object's stored value (per rank for rank-bound ones)")
    p.add_argument("--picture", metavar="FILE.svg", type=svg_path, help="draw which ranks hold which boxes, per module")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_inspect)

    p = command("verify", "recompute every checksum; report each bad shard (exit 1 if any)")
    p.add_argument("ckpt")
    p.add_argument("--module", action="append", help="only this module (repeatable)")
    p.set_defaults(run=_verify)

    p = command("diff", "compare two checkpoints per module, tensor and object (exit 1 if they differ)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--module", action="append", help="only this module (repeatable)")
    p.add_argument("--all", action="store_true", help="also list identical entries")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_diff)

    p = command("reshard", "rewrite some modules for new layouts; other modules' files are shared")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--module", action="append", required=True, metavar="NAME=tp1,dp2,...",
                   help="new layout of a module: sizes tpN cpN epN ppN dpN, offset=N, order=tp-cp-ep-pp-dp; "
                        "what is not named keeps its saved value; once per module")
    p.add_argument("--allow-uneven", action="store_true",
                   help="split tp, ep and pp parts that do not divide a tensor dimension, remainder to the "
                        "first parts (refused by default: megatron builds those parts from equal pieces)")
    p.add_argument("--max-memory", type=parse_size, default=default_max_memory(),
                   help="peak memory of the whole command, e.g. 512M (default: 1/16 of RAM)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes writing files in parallel")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.set_defaults(run=_reshard)

    p = command("compose", "one checkpoint from modules of others, each as stored (files shared: hard links "
                           "on one filesystem), e.g. encoders and an LLM trained or imported apart")
    p.add_argument("dst")
    p.add_argument("--module", action="append", required=True, metavar="NAME=SRC",
                   help="take module NAME from checkpoint SRC (repeatable; each module once)")
    p.add_argument("--max-memory", type=parse_size, default=default_max_memory(),
                   help="peak memory when files are copied across filesystems, e.g. 512M")
    p.set_defaults(run=_compose)

    p = command("split", "modules of a checkpoint as a checkpoint of their own (files shared as by compose)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--module", action="append", required=True, help="module to keep (repeatable)")
    p.add_argument("--max-memory", type=parse_size, default=default_max_memory(),
                   help="peak memory when files are copied across filesystems, e.g. 512M")
    p.set_defaults(run=_split)

    p = command("export", "one module as a Hugging Face folder from_pretrained loads (--format hf, mapped by a "
                          "table), one module's tensors as they are stored (--format safetensors), or modules as "
                          "a megatron-core torch_dist checkpoint (--format torch_dist)")
    p.add_argument("src")
    p.add_argument("--module", action="append",
                   help="module to export (safetensors: exactly one; hf: one, or a composite table's, by default "
                        "all of them; torch_dist: repeatable, default all)")
    p.add_argument("--to", required=True, metavar="DIR")
    p.add_argument("--format", choices=("hf", "safetensors", "torch_dist"), default="hf")
    p.add_argument("--table", metavar="NAME|FILE.json",
                   help="hf: the mapping table, built-in (llama, gpt2, clip_vision; llava for a vision and a "
                        "language module as one model) or a file (default: the one the module was imported with)")
    p.add_argument("--config", metavar="FILE.json", help="hf: config.json fields to write (override what the "
                                                          "checkpoint records and its shapes say)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="hf: one config.json field, e.g. num_attention_heads=32 or "
                        "text_config.vocab_size=32000 (repeatable)")
    p.add_argument("--optimizer", action="store_true",
                   help="hf: also the optimizer state per weight (exp_avg, ...), mapped like the weights, in "
                        "optimizer-*.safetensors beside the model (weights only by default)")
    p.add_argument("--main-param-name", choices=("fp32_param", "param"), default="fp32_param",
                   help="torch_dist: name of fp32 main params, 'fp32_param' (Float16Optimizer) or 'param' "
                        "(DistributedOptimizer, fully_reshardable)")
    p.add_argument("--max-shard-size", type=parse_size, default=5 << 30, help="largest file, e.g. 2G (default 5G)")
    p.add_argument("--rename", metavar="MAP.json", help="safetensors: JSON object mapping checkpoint keys to exported names")
    p.add_argument("--include", metavar="REGEX", type=regex, help="safetensors: only keys matching")
    p.add_argument("--exclude", metavar="REGEX", type=regex, help="safetensors: skip keys matching (e.g. '^optimizer\\.')")
    p.add_argument("--max-memory", type=parse_size, default=default_max_memory(), help="peak memory, e.g. 512M")
    p.set_defaults(run=_export)

    p = command("import", "a megatron-core torch_dist checkpoint of a MIMO model (--format torch_dist), or a "
                          "Hugging Face folder as one module under any layout (--format hf)")
    p.add_argument("src", help="torch_dist checkpoint directory (written by megatron.core.dist_checkpointing.save), "
                               "or a Hugging Face folder (config.json and safetensors)")
    p.add_argument("dst")
    p.add_argument("--format", choices=("torch_dist", "hf"), default="torch_dist")
    p.add_argument("--module", action="append", metavar="NAME=tp2,pp2,...",
                   help="hf: a module's name and the layout to write it for (sizes tpN cpN epN ppN dpN, offset=N); "
                        "once per module of the table (llava: images and language)")
    p.add_argument("--table", metavar="NAME|FILE.json",
                   help="hf: the mapping table, built-in (llama, gpt2, clip_vision, llava) or a file "
                        "(default: by config.json's model_type)")
    p.add_argument("--vocab-multiple", type=positive_int, default=128,
                   help="hf: pad the vocabulary to a multiple of this x TP, as Megatron-LM's "
                        "--make-vocab-size-divisible-by (default 128)")
    p.add_argument("--ignore", metavar="REGEX", type=regex, help="hf: folder tensors that may go unmapped")
    p.add_argument("--max-memory", type=parse_size, default=default_max_memory(), help="hf: peak memory, e.g. 512M")
    p.add_argument("--allow-pickle", action="store_true",
                   help="torch_dist stores objects (param_groups, common.pt) as pickles. By default only plain "
                        "data is read from them (torch.load weights_only) and anything else is an error; this "
                        "flag unpickles them fully, which can run code: use it only for checkpoints you trust")
    p.set_defaults(run=_import)
    return parser


_SOURCES = {"inspect": ("ckpt",), "verify": ("ckpt",), "diff": ("a", "b"), "reshard": ("src",), "split": ("src",),
            "export": ("src",)}
"""The arguments that name a checkpoint to read: a run root or its `latest` stands for the newest
committed step."""


def _resolve_sources(args: argparse.Namespace) -> None:
    from mimo_ckpt.io.runs import resolve_checkpoint

    for name in _SOURCES.get(args.command, ()):
        given = getattr(args, name)
        found = resolve_checkpoint(given)
        if found != given.rstrip("/"):
            print(f"{given}: reading its latest committed step, {found}", file=sys.stderr)
        setattr(args, name, found)
    if args.command == "compose":
        args.module = [f"{n}={resolve_checkpoint(u)}" if sep and u else text
                       for text in args.module for n, sep, u in [text.partition("=")]]


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mimo-ckpt inspect X | head` ends quietly
    args = build_parser().parse_args(argv)
    if getattr(args, "storage_spec", None) is not None:  # read by every storage this command opens
        os.environ["MIMO_CKPT_STORAGE_SPEC"] = json.dumps(args.storage_spec)
    try:
        _resolve_sources(args)
        return args.run(args)
    except (MimoCkptError, OSError) as exc:
        print(f"mimo-ckpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimo-ckpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
