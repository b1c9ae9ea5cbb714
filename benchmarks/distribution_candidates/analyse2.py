"""The shipped test (guardian_plugin.distribution, format 2) on the recorded features, blocks of 200 distinct
queries: python benchmarks/distribution_candidates/analyse2.py mnist|cifar10 [ENVELOPE,...]."""
import os
import sys, numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from guardian_plugin import distribution as D
OUT = os.environ.get("GUARDIAN_CANDIDATES", "/tmp/guardian-candidates")
ds = sys.argv[1]; envs = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else None
cq = float(sys.argv[3]) if len(sys.argv) > 3 else D.CONF_QUANTILE
mq = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "none" else None
B = np.load(f"{OUT}/{ds}_benign.npy", allow_pickle=True).item()
try: A = np.load(f"{OUT}/{ds}_attack.npy", allow_pickle=True).item()
except FileNotFoundError: A = {}
K = 10
def pt(f):  # fake probs/scores reproducing conf, pred, margin exactly
    n = len(f["conf"]); top = 1 - np.exp(-f["conf"])
    p = np.full((n, K), 0.0); rest = (1 - top) / (K - 1)
    p[:] = rest[:, None]; p[np.arange(n), f["pred"]] = top
    return torch.tensor(p), torch.tensor(f["margin"])[:, None]
thr = torch.zeros(1)
cal = B["calib"]; p, s = pt(cal)
env = {k[6:]: pt(B[k]) for k in B if k.startswith("calib:") and (envs is None or k[6:] in envs)}
ref = D.build_reference(p, s, thr, "calib", env, conf_quantile=cq, margin_quantile=mq)
print("envelope", list(env), "conf_edge", ref.conf_edge, "rates", [round(r, 3) for r in ref.rates])
print("rates by set", {k: v["rate"] for k, v in ref.meta["rates_by_set"].items()})
test = D.DistributionTest(ref, 200)
for key in [k for k in sorted(B) if not k.startswith("calib")] + sorted(A):
    f = B.get(key) or A.get(key)
    P, S = pt(f); bins = ref.bin_of(P, S, thr).numpy()
    seen = set(); cur = []; res = []
    for i in range(len(bins)):
        if f["exact"][i] in seen: continue
        seen.add(f["exact"][i]); cur.append(bins[i])
        if len(cur) == 200:
            c = np.bincount(cur, minlength=ref.bins); cur = []
            fails, stat, t = test.evaluate(c.tolist())
            res.append((fails, stat, c[1::2].sum() / 200, ref.expected(c)))
    if not res: print(f"  {key:30s} no block"); continue
    nf = sum(r[0] for r in res); w = max(res, key=lambda r: r[1])
    first = next((i for i, r in enumerate(res) if r[0]), None)
    print(f"  {key:30s} blocks {len(res):2d} fail {nf:2d} first {first}  worst share {w[2]:.3f} vs {w[3]:.3f} stat {w[1]:.1f} (t {t:.1f})")
