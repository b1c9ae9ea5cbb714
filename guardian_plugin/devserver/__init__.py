"""Launchers for tests, demos and benchmarks (loopback only), kept outside the serving path:

- torchserve  TorchServe (a local server), build_archive (torch-model-archiver), torchserve_bin, new_workdir
- bentoml     BentoServer (a real ``bentoml serve``)
- redis       RedisServer (a throwaway redis-server)
- netutil     free_port(s), wait_until_ready
"""
