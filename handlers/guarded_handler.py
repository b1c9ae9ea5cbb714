"""Handler file for torch-model-archiver users: any handler of the archive behind Model-Guardian.

    torch-model-archiver --model-name mnist --version 1.0 --serialized-file model.pt \
        --handler "$(guardian handler-file wrap)" --extra-files my_handler.py,index_to_name.json \
        --config-file model-config.yaml

with ``handler: guardian: {wrap: my_handler.py, guard: {detector: ...}}`` in model-config.yaml
(docs/torchserve.md). Simpler: build the archive as usual and run ``guardian protect`` on it.
TorchServe requires exactly one class defined here.
"""

from guardian_plugin.handlers.GuardedHandler import GuardedHandler as _Guarded


class GuardedHandlerFile(_Guarded):
    pass
