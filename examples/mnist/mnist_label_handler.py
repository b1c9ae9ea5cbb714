"""A label-only archive's handler, the way TorchServe's own MNIST example (examples/image_classifier/
mnist/mnist_handler.py) writes it: the same preprocessing as mnist_handler.py, and a postprocess that
answers the argmax label of each row (an int), no probabilities. Deceptive Predictions change nothing
such clients see (same ranking, same label): the guard says so at load, and ``response: {label_only:
topk, k: 2}`` answers flagged queries with a label drawn from the model's top 2 (docs/torchserve.md).
"""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class MNISTLabelClassifier(ImageClassifier):
    image_processing = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])

    def postprocess(self, data):
        return data.argmax(1).tolist()
