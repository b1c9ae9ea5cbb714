"""PRADA's cost per query (guardian_plugin.prada), one CPU thread: a client sending each calibration split
once, 10 images per request (distances to G_c + the Shapiro-Wilk test at every query), and the
Shapiro-Wilk test alone at larger |D|. docs/prada.md quotes its output.

    python benchmarks/prada_cost.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time, numpy as np, torch
from guardian_plugin.prada import Prada, calibration_data, shapiro_w
torch.set_num_threads(1)
for name in ("mnist", "cifar10"):
    x, p, _, _ = calibration_data(name)
    pr = Prada(delta=1e-12)
    for i in range(0, 200, 10):  # warm-up (first torch and scipy calls), another client
        pr.observe("warm-up", x[i:i + 10], p[i:i + 10])
    t = time.perf_counter()
    for i in range(0, len(x), 10):
        pr.observe("c", x[i:i + 10], p[i:i + 10])
    dt = time.perf_counter() - t
    print(f"{name}: {len(x)} queries, 10 per request: {1e3 * dt / len(x):.2f} ms per query "
          f"(G sizes {sorted(g.n for g in pr.state('c').classes.values())})")
rng = np.random.default_rng(0)
for n in (1000, 10000, 100000):
    d = rng.normal(5, 1, n)
    t = time.perf_counter()
    for _ in range(20):
        shapiro_w(d)
    print(f"W at |D| = {n}: {1e3 * (time.perf_counter() - t) / 20:.2f} ms")
