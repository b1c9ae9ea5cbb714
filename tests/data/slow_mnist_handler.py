"""The example's MNIST handler made slow, for tests/test_torchserve_kill.py: inference and postprocess each
wait ``slow.json``'s ``seconds`` while a marker file ``<stage>-<pid>`` exists in its ``dir``, so the test
can SIGKILL a worker process in the middle of a batch (during inference: before the guard's ledger commit
in either design; during postprocess: after the ledger write of the design before the holds)."""

import json
import os
import time

from mnist_handler import MNISTDigitClassifier

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow.json")) as _f:
    SLOW = json.load(_f)


def _stage(name: str) -> None:
    path = os.path.join(SLOW["dir"], f"{name}-{os.getpid()}")
    open(path, "w").close()
    try:
        time.sleep(SLOW["seconds"])
    finally:
        os.remove(path)


class SlowDigits(MNISTDigitClassifier):
    _serving = False  # the guard probes postprocess at load: no marker then

    def inference(self, data, *args, **kwargs):
        out = super().inference(data, *args, **kwargs)
        self._serving = True
        _stage("infer")
        return out

    def postprocess(self, data):
        out = super().postprocess(data)
        if self._serving:
            _stage("post")
        return out
