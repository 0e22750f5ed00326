import os, time, statistics, sys
import jax, jax.numpy as jnp, numpy as np
B,T,D,O,R = 8,64,512,1024,int(sys.argv[1]) if len(sys.argv)>1 else 8
rng=np.random.default_rng(0)
x=jnp.asarray(rng.normal(size=(B,T,D)).astype("float32"))
W=jnp.asarray(rng.normal(size=(D,O)).astype("float32")*0.02)
A=jnp.asarray(rng.normal(size=(D,R)).astype("float32")*0.02)
Bm=jnp.asarray(rng.normal(size=(R,O)).astype("float32")*0.02)
g=jnp.asarray(rng.normal(size=(B,T,O)).astype("float32"))
s=2.0
def loss(y): return jnp.sum(g*jnp.tanh(y))
def base(x,A,Bm,W): return loss(x@W)
def cur(x,A,Bm,W): return loss(x@W + ((x@A)*s)@Bm)
def twod(x,A,Bm,W):
    x2=x.reshape(-1,D); return loss(x@W + ((x2@A*s)@Bm).reshape(B,T,O))
def fused(x,A,Bm,W):
    x2=x.reshape(-1,D); yc=x2@jnp.concatenate([W,A],1)
    y=yc[:,:O]+ (yc[:,O:]*s)@Bm
    return loss(y.reshape(B,T,O))
@jax.custom_vjp
def lora_branch(x2, A, Bm):
    return ((x2@A)*s)@Bm
def lb_fwd(x2,A,Bm):
    h=(x2@A)*s
    return h@Bm,(x2,A,Bm,h)
def lb_bwd(res,gy):
    x2,A,Bm,h=res
    dh=(gy@Bm.T)*s
    return dh@A.T, x2.T@dh, h.T@gy
lora_branch.defvjp(lb_fwd,lb_bwd)
def custom(x,A,Bm,W):
    x2=x.reshape(-1,D); return loss(x@W + lora_branch(x2,A,Bm).reshape(B,T,O))
def keras(x,A,Bm,W): return loss(x@(W+s*(A@Bm)))
names={"frozen base":base,"lora3 current":cur,"2d":twod,"fused-A":fused,"custom_vjp 2d":custom,"keras":keras}
fns={n:jax.jit(jax.value_and_grad(f,argnums=(0,) if n=="frozen base" else (0,1,2))) for n,f in names.items()}
fns["full (dx,dW)"]=jax.jit(jax.value_and_grad(lambda x,A,Bm,W: loss(x@W),argnums=(0,3)))
args=(x,A,Bm,W)
for n,f in fns.items(): jax.block_until_ready(f(*args))
ref=fns["lora3 current"](*args)
res={n:[] for n in fns}
for _ in range(40):
    for n,f in fns.items():
        t=time.perf_counter(); jax.block_until_ready(f(*args)); res[n].append(time.perf_counter()-t)
for n in fns:
    c=fns[n].lower(*args).compile().cost_analysis(); c=c[0] if isinstance(c,list) else c
    out=fns[n](*args)
    diff = max(float(jnp.max(jnp.abs(a-b))) for a,b in zip(out[1],ref[1])) if len(out[1])==3 else float('nan')
    m=statistics.median(res[n]); print(f"R={R} {n:16s} {m*1e3:7.2f} ms  {c['flops']/1e6:8.1f} MF  {c['flops']/m/1e9:6.1f} GF/s  graddiff {diff:.1e}")
