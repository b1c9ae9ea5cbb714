"""Candidate uncertain regions (confidence below the 2% / 10% / 40% quantile, detector margin above its
98% quantile, their union) as one-sided block tests, optionally with an envelope of calibration-split
nuisances: python benchmarks/distribution_candidates/analyse.py mnist|cifar10 [SPEC,SPEC,...]
(reads features.py's output)."""
import os
import sys, math, numpy as np
OUT = os.environ.get("GUARDIAN_CANDIDATES", "/tmp/guardian-candidates")
ds = sys.argv[1]
B = np.load(f"{OUT}/{ds}_benign.npy", allow_pickle=True).item()
try: A = np.load(f"{OUT}/{ds}_attack.npy", allow_pickle=True).item()
except FileNotFoundError: A = {}
K = 10; n_block = 200; alpha = 1e-6 / 50
cal = B["calib"]
ce = np.quantile(cal["conf"], [0.02, 0.1, 0.4]); me = np.quantile(cal["margin"], [0.5, 0.98])
def fbin(f): return np.searchsorted(ce, f["conf"], side="right") * 3 + np.searchsorted(me, f["margin"], side="right")
ENV = sys.argv[2].split(",") if len(sys.argv) > 2 else []
SETS = {"lowconf": lambda b: b // 3 <= 1, "lowconf0": lambda b: b // 3 == 0, "lowconf_or_hm": lambda b: (b // 3 <= 1) | (b % 3 == 2),
        "hm": lambda b: b % 3 == 2, "lowconf2": lambda b: b // 3 <= 2}
def env_rates(S):
    u = np.zeros(K); 
    for t in ["calib"] + ["calib:" + e for e in ENV]:
        f = B[t]; s = S(fbin(f)); p = f["pred"]
        r = np.array([(s[p == c].sum() + 1) / ((p == c).sum() + 2) for c in range(K)])
        u = np.maximum(u, r)
    return u
def klb(a, s): 
    a = min(max(a, 1e-12), 1 - 1e-12); return a * math.log(a / s) + (1 - a) * math.log((1 - a) / (1 - s))
def blocks(f, S, u, dedup=True):
    seen = set(); out = []; cur = []
    for i in range(len(f["conf"])):
        if dedup:
            if f["exact"][i] in seen: continue
            seen.add(f["exact"][i])
        cur.append(i)
        if len(cur) == n_block:
            idx = np.array(cur); cur = []
            s_in = S(fbin({k: f[k][idx] for k in ("conf", "margin")}))
            k = s_in.mean(); sexp = u[f["pred"][idx]].mean()
            stat = n_block * klb(k, sexp) if k > sexp else 0.0
            out.append((round(k, 3), round(sexp, 3), stat))
    return out
thr = math.log(1 / alpha)
for name, S in SETS.items():
    u = env_rates(S)
    print(f"== S={name} env={ENV} threshold {thr:.1f}; u = {np.round(u, 3)}")
    for key in sorted(B) + sorted(A):
        if key.startswith("calib"): continue
        f = B.get(key) or A.get(key)
        bl = blocks(f, S, u)
        if not bl: print(f"  {key:28s} no complete block"); continue
        fails = [i for i, b in enumerate(bl) if b[2] >= thr]
        worst = max(bl, key=lambda b: b[2])
        print(f"  {key:28s} blocks {len(bl):2d} fail {len(fails):2d} first {fails[0] if fails else '-'}  worst share {worst[0]} vs {worst[1]} stat {worst[2]:.1f}")
