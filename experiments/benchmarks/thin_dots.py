"""The thin rank-r products of a LoRA layer, one at a time, on JAX CPU (FLAN-T5-small FFN sizes).

    python experiments/benchmarks/thin_dots.py

Shows that the gradient of A (`x^T @ g`, contracting the token dimension) runs several times slower
than the forward product `x @ A` of the same FLOPs when it is laid out `(in, rank)`, and not when it
is laid out `(rank, in)` (`g^T @ x`: why lora3 stores `lora_A` as `(rank, in)`, as PEFT does); and how
much of the slow layout an explicit transpose behind an optimisation barrier recovers (JAX-only:
keras.ops has no barrier). Medians of 300 calls, each including jit dispatch (~20-30 us).
"""
import jax, jax.numpy as jnp, numpy as np, time, statistics
N,D,R,O=512,512,8,1024
rng=np.random.default_rng(0)
x=jnp.asarray(rng.normal(size=(N,D)),jnp.float32); g=jnp.asarray(rng.normal(size=(N,R)),jnp.float32)
dy=jnp.asarray(rng.normal(size=(N,O)),jnp.float32); h=g
A=jnp.asarray(rng.normal(size=(D,R)),jnp.float32); B=jnp.asarray(rng.normal(size=(R,O)),jnp.float32)
W=jnp.asarray(rng.normal(size=(D,O)),jnp.float32)
def time_all(fns):
    """Median of 300 calls per function, after one compiling call."""
    for f, a in fns.values():
        jax.block_until_ready(f(*a))
    for n, (f, a) in fns.items():
        t = []
        for _ in range(300):
            t0 = time.perf_counter(); jax.block_until_ready(f(*a)); t.append(time.perf_counter() - t0)
        print(f"{n:20s} {statistics.median(t)*1e6:8.1f} us")
fs={
 "xA (N,D)@(D,R)": (jax.jit(lambda x,A: x@A),(x,A)),
 "dA x^T g": (jax.jit(lambda x,g: jnp.einsum('nd,nr->dr',x,g)),(x,g)),
 "dA via (g^T x)^T": (jax.jit(lambda x,g: (g.T@x).T),(x,g)),
 "dA^T g^T x (rank, in)": (jax.jit(lambda x,g: g.T@x),(x,g)),
 "x @ A^T, A (rank, in)": (jax.jit(lambda x,At: x@At.T),(x,A.T.copy())),
 "hB (N,R)@(R,O)": (jax.jit(lambda h,B: h@B),(h,B)),
 "dyB^T": (jax.jit(lambda dy,B: dy@B.T),(dy,B)),
 "dB h^T dy": (jax.jit(lambda h,dy: jnp.einsum('nr,no->ro',h,dy)),(h,dy)),
 "big x@W": (jax.jit(lambda x,W: x@W),(x,W)),
 "add NxO": (jax.jit(lambda a,b: a+b),(dy,dy)),
}
time_all(fs)
print("---")
def tb(x,g):
    xt=jax.lax.optimization_barrier(x.T)
    return xt@g
fs2={"dA x^T g":(jax.jit(lambda x,g: jnp.einsum('nd,nr->dr',x,g)),(x,g)),
     "dA barrier T":(jax.jit(tb),(x,g)),
     "transpose only":(jax.jit(lambda x: jax.lax.optimization_barrier(x.T)),(x,)),
     "xA":(jax.jit(lambda x,A: x@A),(x,A)),
     "dB h^T dy":(jax.jit(lambda h,dy: jnp.einsum('nr,no->ro',h,dy)),(h,dy)),
     "dB barrier":(jax.jit(lambda h,dy: jax.lax.optimization_barrier(h.T)@dy),(h,dy)),
}
time_all(fs2)
