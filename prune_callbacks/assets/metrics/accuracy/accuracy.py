"""Accuracy metric, an offline copy of the ``evaluate`` ``accuracy`` module.

Same interface and results as https://huggingface.co/spaces/evaluate-metric/accuracy
(``sklearn.metrics.accuracy_score``), computed with numpy so that scikit-learn
is not needed.  Loaded by ``prune_callbacks.assets.load_metric("accuracy")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`boolean`): If False, return the (weighted) number of correct predictions
        instead of the fraction. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    accuracy (`float` or `int`): 1.0 means all predictions are correct, 0.0 none.

Examples:
    >>> accuracy_metric = prune_callbacks.assets.load_metric("accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": correct if sample_weight is not None else int(correct)}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total else 0.0}
