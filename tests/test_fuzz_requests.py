"""Property-based fuzzing of request bodies against REAL servers (issue #10: every request gets its own
right answer).

Servers, one per module: TorchServe 0.12 serving the example MNIST archive `guardian protect`ed (2
workers, batch_size 8, max_batch_delay 20 ms), and `bentoml serve bento.service:MNISTGuarded` (2
workers) with its APIs ``classify`` (one image) and ``classify_batch`` (batchable list of images).

Each hypothesis case (tests/fuzz_strategies.py: random bytes, truncated/mutated PNGs and JPEGs, headers
claiming huge dimensions, non-image files, base64 text, JSON of any shape with NaN/Infinity, multipart
with wrong field names or several files, any content type, empty) is sent with its own X-Client-Id,
together with a benign digit from another client (so both can land in one server batch). For every case:

- the fuzzed request gets no 5xx; a 200 carries well-formed probability rows, any other status the
  JSON body {"code": status, "type": str, "message": str}
- the benign request sent alongside gets 200 and the same top-1 as the benign digit alone

After the run: no worker died (TorchServe's management API shows both workers READY; bentoml serve is
alive and ready), a benign digit is still answered correctly, and the ledger counts only answered
rows: each client's ``queries`` equals the rows of its 200 answers (0 for a refused/bad request).

Derandomized (fixed seed, no example database), so CI runs the same cases every time. FUZZ_EXAMPLES
(environment) overrides the number of cases per endpoint. Run with -s to see the per-endpoint
summary (it is also written through capsys.disabled()).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("bentoml")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, given, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_strategies as fz  # noqa: E402

from examples.mnist import serving as ex  # noqa: E402

# cases per endpoint; the three endpoints together keep the file near 90 s on a 2-core machine
EXAMPLES = {"torchserve": 400, "classify": 400, "classify_batch": 400}
if os.environ.get("FUZZ_EXAMPLES"):
    EXAMPLES = {k: int(os.environ["FUZZ_EXAMPLES"]) for k in EXAMPLES}


@pytest.fixture(scope="module")
def digits():
    imgs, labels = ex.real_digits(8)
    return imgs, labels


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    ts, target = fz.start_torchserve(str(tmp_path_factory.mktemp("fuzz_torchserve")))
    yield target
    ts.stop()


@pytest.fixture(scope="module")
def bento(tmp_path_factory):
    srv, targets = fz.start_bento(str(tmp_path_factory.mktemp("fuzz_bento")))
    yield {t.api: t for t in targets}
    srv.stop()


def run_fuzz(target, digits, n: int, records: list):
    """Send ``n`` derandomized hypothesis cases, each with a benign digit alongside (fz.probe); fails on
    the first case that breaks a property (hypothesis then shrinks it). Appends each case's record to
    ``records``."""
    sessions = (requests.Session(), requests.Session())
    top = fz.reference_top1(target, sessions[0], digits)
    assert sum(t == y for t, y in zip(top, digits[1])) >= 7, (top, digits[1])
    counter = itertools.count()
    pool = ThreadPoolExecutor(1)

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(case=fz.cases())
    def one(case):
        rec = fz.probe(target, case, next(counter), sessions, pool, digits, top)
        records.append(rec)
        assert rec["problem"] is None, \
            f"{target.name}: {rec['case']} -> {rec['problem']}\n--- server log ---\n{target.log_tail()[-3000:]}"
        assert rec["benign_problem"] is None, f"{target.name}: alongside {rec['case']}: {rec['benign_problem']}"

    t0 = time.perf_counter()
    try:
        one()
    finally:
        pool.shutdown()
    return time.perf_counter() - t0


def _fuzz_and_check(target, digits, capsys):
    records, t0 = [], time.perf_counter()
    try:
        run_fuzz(target, digits, EXAMPLES[target.api], records)
    finally:
        wall = time.perf_counter() - t0
        line = fz.summary_line(fz.summary(target.name, records, wall))
        print(line)
        with capsys.disabled():
            sys.stdout.write("\n" + line + "\n")
    s = fz.summary(target.name, records, wall)
    assert s["5xx"] == 0 and s["problems"] == 0, line
    assert len(records) >= EXAMPLES[target.api] // 2, f"too few cases tried: {line}"
    problems = fz.after_run_problems(target, digits, records)
    assert not problems, "\n".join(problems) + f"\n{line}\n--- server log ---\n{target.log_tail()[-3000:]}"


def test_fuzz_torchserve(torchserve, digits, capsys):
    _fuzz_and_check(torchserve, digits, capsys)


@pytest.mark.parametrize("api", ["classify", "classify_batch"])
def test_fuzz_bentoml(bento, api, digits, capsys):
    _fuzz_and_check(bento[api], digits, capsys)
