#!/usr/bin/env python
"""Print LoRA parameter counts for a keras-hub architecture (no download).

Examples:
    python scripts/param_table.py                                 # FLAN-T5-base, r=4,8,16, qv/attention/all_linear
    python scripts/param_table.py --arch gemma_2b_en --ranks 8 64 --targets qv all_linear
    python scripts/param_table.py --backbone T5Backbone --config '{"vocabulary_size": 100, ...}'
    python scripts/param_table.py --json table.json
"""

import argparse
import json
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="flan_base_multi", help="a known architecture (see lora3.param_table.ARCHITECTURES)")
    parser.add_argument("--backbone", help="a keras_hub.models backbone class name, with --config")
    parser.add_argument("--config", help="JSON config for --backbone")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--targets", nargs="+", default=["qv", "attention", "all_linear"])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"), choices=["jax", "tensorflow", "torch"])
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported

    from lora3.errors import Lora3Error
    from lora3.param_table import ARCHITECTURES, build_backbone, format_markdown, param_table

    if args.backbone:
        if not args.config:
            parser.error("--backbone needs --config")
        config = json.loads(args.config)
        factory, title = (lambda: build_backbone(args.backbone, config)), args.backbone
    else:
        if args.arch not in ARCHITECTURES:
            parser.error(f"unknown --arch {args.arch!r}; known: {', '.join(ARCHITECTURES)}")
        factory, title = (lambda: build_backbone(args.arch)), args.arch
    try:
        rows = param_table(factory, ranks=args.ranks, target_groups=args.targets)
    except Lora3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_markdown(rows, title=f"{title}: {rows[0]['base_params']:,} base params"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
