"""The `mimo-ckpt` command line. Reads manifests only; never imports torch or megatron-core."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MimoCkptError
from .manifest import Manifest, read_manifest
from .storage import open_storage

__all__ = ["main"]


def _summary(manifest: Manifest) -> dict:
    modules = {}
    for name, entry in sorted(manifest.modules.items()):
        layout = entry.layout
        modules[name] = {
            "layout": layout.to_json(),
            "ranks": [layout.rank_offset, layout.rank_offset + layout.size - 1],
            "bytes": entry.nbytes,
            "tensors": {
                key: {"dtype": t.dtype, "shape": list(t.global_shape), "shards": len(t.shards),
                      "bytes": sum(s.end - s.begin for s in t.shards)}
                for key, t in sorted(entry.tensors.items())
            },
            "objects": sorted(entry.objects),
        }
    return {"version": manifest.version, "world_size": manifest.world_size,
            "metadata": dict(manifest.metadata), "modules": modules}


def _inspect(args: argparse.Namespace) -> int:
    summary = _summary(read_manifest(open_storage(args.ckpt), source=args.ckpt))
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0
    print(f"{args.ckpt}: format v{summary['version']}, saved by {summary['world_size']} ranks")
    for name, m in summary["modules"].items():
        lay = m["layout"]
        sizes = " ".join(f"{d}{lay[d]}" for d in lay["order"])
        print(f"\nmodule {name}: {sizes}, ranks {m['ranks'][0]}-{m['ranks'][1]}, "
              f"{len(m['tensors'])} tensors, {m['bytes']:,} bytes, objects: {', '.join(m['objects']) or '-'}")
        width = max((len(k) for k in m["tensors"]), default=3)
        for key, t in m["tensors"].items():
            print(f"  {key:<{width}}  {t['dtype']:<5} {str(t['shape']):<20} {t['bytes']:>14,} B  {t['shards']} shards")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimo-ckpt", description="Inspect mimo-ckpt checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="modules, layouts and tensors of a checkpoint (manifest only)")
    p.add_argument("ckpt", help="checkpoint directory or tensorstore URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MimoCkptError as exc:
        print(f"mimo-ckpt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
