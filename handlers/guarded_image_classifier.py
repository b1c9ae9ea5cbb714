"""Handler file for torch-model-archiver users: TorchServe's ImageClassifier behind Model-Guardian.

    torch-model-archiver --model-name mnist --version 1.0 --serialized-file model.pt \
        --handler "$(guardian handler-file image-classifier)" --config-file model-config.yaml \
        --extra-files index_to_name.json

model-config.yaml needs a ``handler: guardian: guard: {detector: ...}`` section (docs/torchserve.md).
The worker must have guardian-plugin installed. TorchServe requires exactly one class defined here.
"""

from guardian_plugin.handlers.GuardedImageClassifier import GuardedImageClassifier as _Guarded


class GuardedImageClassifierHandler(_Guarded):
    pass
