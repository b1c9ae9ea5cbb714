"""The example archive's own handler, the way TorchServe's MNIST example writes one: an ImageClassifier
whose preprocessing turns a 28x28 grayscale digit into the victim's input (ToTensor, then MNIST's
mean/std). It answers with all ten classes' probabilities (top-10 {label: probability}), so the
responses carry what a soft-label model-stealing attack learns from. Nothing here knows about the guard:
``guardian protect`` wraps this file as it is.
"""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class MNISTDigitClassifier(ImageClassifier):
    topk = 10
    image_processing = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
