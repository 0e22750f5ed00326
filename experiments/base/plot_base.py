"""Copies the default base's base_info.json here and plots its pre-training curve (base_curve.png).

    python experiments/base/plot_base.py [<cache_dir>]     # default: lora3's per-user cache
"""

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lora3.run import pretrain  # noqa: E402

with initialize_config_module(config_module="lora3.run.conf", version_base="1.3"):
    model = OmegaConf.to_container(compose("config"), resolve=True)["model"]
path = pretrain.base_dir(model, sys.argv[1] if len(sys.argv) > 1 else None)
info = pretrain.read_info(path)
if info is None:
    sys.exit(f"no base at {path}: build it with `python -m lora3.run.pretrain`")
here = Path(__file__).parent
shutil.copy(path / pretrain.INFO_FILE, here / pretrain.INFO_FILE)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

c = info["curve"]
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot([p["step"] for p in c], [p["train/loss"] for p in c], "-o", label="train loss (mean over the period)")
ax.plot([p["step"] for p in c], [p["val/loss"] for p in c], "-s", label="val loss (source task)")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("loss")
sv = info["source_val"]
ax.set_title(f"Base pre-training ({info['source_task']['variant'] or info['source_task'].get('name')} + denoising): "
             f"final BLEU {sv['bleu']:.1f}", fontsize=9)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(here / "base_curve.png", dpi=110)
print(json.dumps({"path": str(path), "source_val": sv, "curve": c, "build_seconds": info["build_seconds"],
                  "build_cpu_seconds": info.get("build_cpu_seconds")}, indent=1))
