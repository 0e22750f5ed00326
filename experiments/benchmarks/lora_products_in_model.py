"""lora3's rank-r products (`lora3.layers.low_rank`, unrolled with their own gradients) against plain
dots, in the whole FLAN-T5-small bench step, side by side in one process.

    KERAS_BACKEND=jax python experiments/benchmarks/lora_products_in_model.py [ROUNDS]

Builds the bench's `frozen-floor` model and two `lora3-all_linear` models, one traced with
`low_rank.expand`/`project` as they are and one with them swapped for `ops.matmul` while it compiles,
then times one `train_on_batch` of each in turn (default 15 rounds) and prints medians and their ratio
to the floor. The same batch, rank (8) and optimizer as `python -m lora3.bench`.
"""
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras import ops  # noqa: E402

import lora3.layers.low_rank as low_rank  # noqa: E402
from lora3.bench.setups import keras_worker as kw  # noqa: E402

LOW_RANK = (low_rank.expand, low_rank.project)
DOTS = (lambda h, b: ops.matmul(h, ops.cast(b, h.dtype)),
        lambda x, a: ops.matmul(x, ops.transpose(ops.cast(a, x.dtype))))
VARIANTS = {"frozen floor": ("frozen-floor", LOW_RANK), "lora3 all_linear": ("lora3-all_linear", LOW_RANK),
            "all_linear, plain dots": ("lora3-all_linear", DOTS)}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15

models = {}
for name, (setup, (expand, project)) in VARIANTS.items():
    spec = dict(model="small", batch=8, enc_len=64, dec_len=32, seed=0, rank=8, alpha=16.0, setup=setup)
    x, y, _ = kw.train_batch(spec)
    low_rank.expand, low_rank.project = expand, project  # read when the step is traced, below
    model, _ = kw.ready_model(spec)
    for _ in range(3):
        model.train_on_batch(x, y)
    low_rank.expand, low_rank.project = LOW_RANK
    models[name] = (model, x, y)

times = {name: [] for name in models}
for i in range(rounds):
    for name, (model, x, y) in (models.items() if i % 2 == 0 else reversed(models.items())):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times[name].append(time.perf_counter() - t0)
floor = statistics.median(times["frozen floor"])
for name in models:
    median = statistics.median(times[name])
    print(f"{name:24s} {median:.4f} s/step  {median / floor:.3f}x floor")
