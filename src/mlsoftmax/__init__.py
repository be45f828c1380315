"""mlsoftmax: the multi-label softmax cross-entropy for PyTorch, fast and exact."""

from .targets import Positives
from .loss import MultiLabelSoftmaxLoss, multilabel_softmax_loss
from .linear import LinearMultiLabelSoftmaxLoss, linear_multilabel_softmax_loss

__all__ = [
    "Positives",
    "multilabel_softmax_loss",
    "MultiLabelSoftmaxLoss",
    "linear_multilabel_softmax_loss",
    "LinearMultiLabelSoftmaxLoss",
]
__version__ = "0.1.0"
