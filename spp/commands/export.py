"""`spp export`: one member of a search's family, compressed and saved without pickles."""
from __future__ import annotations

import json
import os

from ..build import HeldOutScore, check_inputs, search_output, searched_family, select_member
from ..compress import compress, save_pruned
from ..config import Config
from ..files import atomic_write
from ..runtime import setup_runtime

__all__ = ["run_export"]


def run_export(cfg: Config) -> str:
    """Select one member, compress it and ``save_pruned`` it."""
    check_inputs(cfg)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)   # where rank / values best score their readings
    directory = search_output(cfg, cfg.export.path)
    model, family = searched_family(cfg, directory, runtime)
    member = select_member(family, cfg.export, HeldOutScore(cfg, runtime, model, family.granularity,
                                                            cfg.export.max_batches))
    pruned = compress(model.cpu(), member.masks, granularity=family.granularity)
    out = cfg.export.out or os.path.join(cfg.output, "pruned")
    save_pruned(pruned, out)
    atomic_write(os.path.join(out, "summary.json"),
                 lambda f: open(f, "w").write(json.dumps(member.summary.to_dict(), indent=1) + "\n"))
    print(member.summary)
    print(f"wrote {out}/model.safetensors, config.json, summary.json")
    return out
