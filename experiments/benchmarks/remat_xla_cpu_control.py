"""Control for remat_memory.py: does XLA on this device lower a step's temporary memory under jax.checkpoint?

Pure JAX, no Keras: 10 blocks of tanh(tanh(h @ w) @ w) on a (4096, 1024) batch, the gradient compiled
with and without jax.checkpoint around each block. Measured here (XLA:CPU, 2026-12-02): 369 MB without,
520 MB with: XLA's CPU scheduler does not turn recomputation into lower peak memory, so trainer.remat's
memory claim can only be measured on an accelerator (experiments/benchmarks/gpu_run2.sh runs both).

    python experiments/benchmarks/remat_xla_cpu_control.py
"""

import jax
import jax.numpy as jnp

W = [jnp.ones((1024, 1024)) * 0.01 for _ in range(10)]
x = jnp.ones((4096, 1024))


def block(w, h):
    return jnp.tanh(jnp.tanh(h @ w) @ w)


for remat in (False, True):
    f = jax.checkpoint(block) if remat else block

    def loss(ws):
        h = x
        for w in ws:
            h = f(w, h)
        return jnp.sum(h)

    compiled = jax.jit(jax.grad(loss)).lower(W).compile()
    print(f"{jax.devices()[0].platform} remat={remat}: temp {compiled.memory_analysis().temp_size_in_bytes / 1e6:.1f} MB")
