"""Per-query features for the distribution-test candidates (issue #26): victim confidence, predicted class,
detector margin and an exact digest of every query of the benign-suite clients (test split), of the
calibration split as it is and under guardian_plugin.nuisance.DEFAULT_ENVELOPE, and of recorded attack
streams. Exploratory; the figures it led to are quoted in docs/refusal-rule.md section 2.

    python benchmarks/distribution_candidates/features.py mnist|cifar10 N benign|attack
(attack: the windows of `guardian evaluate --config benchmarks/distribution_candidates/<ds>_streams.yaml
--out $GUARDIAN_CANDIDATES/<ds>_streams`; output $GUARDIAN_CANDIDATES/<ds>_<mode>.npy, default /tmp/guardian-candidates)
"""
import glob, os, sys, numpy as np, torch
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import benign_suite as bs
torch.set_num_threads(1)
OUT = os.environ.get("GUARDIAN_CANDIDATES", "/tmp/guardian-candidates")
os.makedirs(OUT, exist_ok=True)
ds_name = sys.argv[1]; N = int(sys.argv[2]); mode = sys.argv[3]
ds = bs.load_dataset(ds_name)
from guardian_plugin.config import parse_config
from guardian_plugin.guardian import Guardian
g = Guardian.from_config(parse_config({"detector": ds.detector, "ledger": "memory://", "distribution": {"enabled": False}})); det = g.detector
thr = det.thresholds.double()

def feats(x):  # x normalised float (N,C,H,W)
    out = {k: [] for k in ("conf", "margin", "pred", "top2", "ahash", "exact")}
    with torch.no_grad():
        for i in range(0, len(x), 500):
            xb = x[i:i+500]
            p = torch.softmax(ds.victim(xb), 1).double()
            pix = det.to_pixels(xb)
            s = det.scores(pix).double()
            top = p.topk(2, 1).values
            out["conf"].append(-torch.log((1 - top[:, 0]).clamp_min(1e-7)))
            out["top2"].append(top[:, 0] - top[:, 1])
            out["margin"].append((s - thr).max(1).values)
            out["pred"].append(p.argmax(1))
            gray = pix.mean(1, keepdim=True)
            sm = torch.nn.functional.adaptive_avg_pool2d(gray, 8).flatten(1)
            bits = (sm > sm.mean(1, keepdim=True)).long()
            out["ahash"].append((bits * (2 ** torch.arange(64) % (2**62))).sum(1))
            q = (pix * 255).round().to(torch.uint8).flatten(1).numpy()
            out["exact"].append(torch.tensor([hash(r.tobytes()) for r in q]))
    return {k: torch.cat(v).numpy() for k, v in out.items()}

res = {}
if mode == "benign":
  if ds_name == "mnist":
      from guardian_plugin.training.data import mnist_splits
      xc, yc = mnist_splits()["train"]; xc, yc = xc[3000:4000], yc[3000:4000]
  else:
      from guardian_plugin.training.data import cifar10_split
      xc, yc = cifar10_split("calibrate")
  res["calib"] = {**feats(ds.as_input(xc)), "label": yc}
  rng = np.random.default_rng(7)
  from guardian_plugin import nuisance
  for t in nuisance.DEFAULT_ENVELOPE:
      imgs = nuisance.apply(t, xc, seed=len(res))
      res["calib:" + t] = {**feats(ds.as_input(imgs)), "label": yc}
      print("calib", t, flush=True)
  for c in bs.clients_for(ds, 0):
      imgs = bs.client_images(ds, c, N, 1000 + hash(c.name) % 1000)
      res["client:" + c.name] = feats(ds.as_input(imgs))
      print("client", c.name, flush=True)
if mode == "attack":
  for f in sorted(glob.glob(f"{OUT}/{ds_name}_streams*/windows/*.pt")):
      w = torch.cat([t.float() for t in torch.load(f, weights_only=True)])
      res["attack:" + os.path.basename(f)[:-3]] = feats(w)
      print("attack", f, len(w), flush=True)
np.save(f"{OUT}/{ds_name}_{mode}.npy", res, allow_pickle=True)
