"""Command line: ``spp {search,family,export,retrain,eval} CONFIG [key=value ...]``, ``spp demo[-llm|-clip]``.

Bad input (a config value, a missing file, another model's checkpoint) prints one ``spp CMD: error:`` line and
exits 2; ``SPP_TRACEBACK=1`` shows the traceback as well.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__
from .config import load_config
from .data import DatasetNotFound
from .demo import run_demo
from .demo_clip import run_demo_clip
from .demo_llm import run_demo_llm
from .errors import CheckpointError, ConfigError, NonFiniteLoss
from .commands import run_eval, run_export, run_family, run_retrain, run_search
from .structure import UnsupportedModel

COMMANDS = {
    "search": "run the LBI search over the masks; writes the solution path and the family table",
    "family": "evaluate family members at family.targets without retraining; table + plot",
    "export": "select one member (export.keep/remove/budget), compress and save it",
    "retrain": "finetune a member (train.source) or train a dense model: the DeiT recipe, or next-token (LoRA) for LLMs",
    "eval": "top-1/top-5 (LLMs: perplexity, zero-shot tasks; CLIP: retrieval recall, zero-shot), params, FLOPs and "
            "throughput of train.source",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spp", description="Solution Path Pruning for vision transformers, LLMs and CLIP")
    parser.add_argument("--version", action="version", version=f"spp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. search.lr=5e-4")
    demo = sub.add_parser("demo", help="pretrain, search, family, export and retrain on Fashion-MNIST")
    demo.add_argument("--output", default="outputs/demo", help="where the demo writes (default outputs/demo)")
    demo.add_argument("--fresh", action="store_true", help="pretrain again even if a cached model exists")
    demo.add_argument("overrides", nargs="*", default=[], help="key=value overrides applied to every stage")
    demo_llm = sub.add_parser("demo-llm", help="the same on a real pretrained LLM (SmolLM2-135M) and the Python documentation")
    demo_llm.add_argument("--output", default="outputs/demo_llm", help="where the demo writes (default outputs/demo_llm)")
    demo_llm.add_argument("--fresh", action="store_true", help="dequantize the GGUF again even if the cached model exists")
    demo_llm.add_argument("overrides", nargs="*", default=[], help="key=value overrides applied to every stage")
    demo_clip = sub.add_parser("demo-clip", help="the same on a small CLIP trained on Fashion-MNIST images and captions")
    demo_clip.add_argument("--output", default="outputs/demo_clip", help="where the demo writes (default outputs/demo_clip)")
    demo_clip.add_argument("--fresh", action="store_true", help="pretrain again even if a cached model exists")
    demo_clip.add_argument("overrides", nargs="*", default=[], help="key=value overrides applied to every stage")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``spp`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args.output, args.overrides, fresh=args.fresh)
            return 0
        if args.command == "demo-llm":
            run_demo_llm(args.output, args.overrides, fresh=args.fresh)
            return 0
        if args.command == "demo-clip":
            run_demo_clip(args.output, args.overrides, fresh=args.fresh)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "search":
            run_search(cfg)
        elif args.command == "family":
            run_family(cfg)
        elif args.command == "export":
            run_export(cfg)
        elif args.command == "retrain":
            run_retrain(cfg)
        else:
            run_eval(cfg)
    except (ConfigError, DatasetNotFound, FileNotFoundError, CheckpointError, NonFiniteLoss, UnsupportedModel,
            ValueError) as e:   # bad input: a config value, a file, a model; the message names the fix
        print(f"spp {args.command}: error: {e}", file=sys.stderr)
        if os.environ.get("SPP_TRACEBACK"):
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
