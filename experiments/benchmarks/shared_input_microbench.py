"""One `x @ [A_q|A_k|A_v]` product for three LoRA layers that read the same input, against three
separate products, forward + backward (dx, dA, dB) on JAX CPU, frozen W. The idea behind a change
that was measured and reverted (see README: no end-to-end gain).

    python experiments/benchmarks/shared_input_microbench.py
"""
import jax, jax.numpy as jnp, numpy as np, time, statistics
N,D,O,R=512,512,384,8; s=2.0
rng=np.random.default_rng(0)
x=jnp.asarray(rng.normal(size=(N,D)),jnp.float32)
Ws=[jnp.asarray(rng.normal(size=(D,O))*0.02,jnp.float32) for _ in range(3)]
As=[jnp.asarray(rng.normal(size=(D,R))*0.02,jnp.float32) for _ in range(3)]
Bs=[jnp.asarray(rng.normal(size=(R,O))*0.02,jnp.float32) for _ in range(3)]
gs=[jnp.asarray(rng.normal(size=(N,O)),jnp.float32) for _ in range(3)]
def loss(ys): return sum(jnp.sum(g*jnp.tanh(y)) for g,y in zip(gs,ys))
def frozen(x,As,Bs): return loss([x@W for W in Ws])
def sep(x,As,Bs): return loss([x@W + ((x@A)*s)@B for W,A,B in zip(Ws,As,Bs)])
def grp(x,As,Bs):
    h=(x@jnp.concatenate(As,1))*s
    return loss([x@W + h[:,i*R:(i+1)*R]@B for i,(W,B) in enumerate(zip(Ws,Bs))])
fs={"frozen":jax.jit(jax.grad(frozen)),"sep":jax.jit(jax.grad(sep,argnums=(0,1,2))),"grp":jax.jit(jax.grad(grp,argnums=(0,1,2)))}
for f in fs.values(): jax.block_until_ready(f(x,As,Bs))
a=fs["sep"](x,As,Bs); b=fs["grp"](x,As,Bs)
print("maxdiff", max(float(jnp.max(jnp.abs(u-v))) for u,v in zip(jax.tree.leaves(a),jax.tree.leaves(b))))
t={n:[] for n in fs}
for _ in range(200):
    for n,f in fs.items():
        t0=time.perf_counter(); jax.block_until_ready(f(x,As,Bs)); t[n].append(time.perf_counter()-t0)
for n in fs: print(n, round(statistics.median(t[n])*1e3,3),"ms")
