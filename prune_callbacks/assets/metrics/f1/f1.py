"""F1 metric, an offline copy of the ``evaluate`` ``f1`` module.

Same interface and results as https://huggingface.co/spaces/evaluate-metric/f1
(``sklearn.metrics.f1_score`` with ``zero_division=0``), computed with numpy so
that scikit-learn is not needed.  Loaded by ``prune_callbacks.assets.load_metric("f1")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    labels (`list` of `int`): Labels to include when `average != 'binary'`, and their order when
        `average is None`. Defaults to all labels seen in predictions or references, sorted.
    pos_label (`int`): The positive class when `average='binary'`. Defaults to 1.
    average (`string`): 'binary' (default; only the `pos_label` class), 'micro' (global counts),
        'macro' (unweighted mean over labels), 'weighted' (mean weighted by support) or None
        (one score per label).
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    f1 (`float` or `list` of `float`): between 0 and 1; a list per label when `average=None`.
    A label with no true and no predicted samples scores 0 (sklearn's `zero_division=0`).

Examples:
    >>> f1_metric = prune_callbacks.assets.load_metric("f1")
    >>> f1_metric.compute(predictions=[0, 1, 0, 1, 0], references=[0, 0, 1, 1, 0])
    {'f1': 0.5}
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

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _f1(tp, fp, fn):
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp, dtype=float), where=denominator > 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        y_pred = np.asarray(predictions)
        y_true = np.asarray(references)
        if y_pred.shape != y_true.shape:
            raise ValueError(f"predictions {y_pred.shape} and references {y_true.shape} differ in shape")
        weights = np.ones(len(y_true)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        present = np.union1d(y_true, y_pred)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"Target is multiclass ({len(present)} labels) but average='binary'; "
                    "choose average='micro', 'macro' or 'weighted'"
                )
            if len(present) == 2 and pos_label not in present:
                raise ValueError(f"pos_label={pos_label} is not a valid label: {present.tolist()}")
            labels = [pos_label]
        elif labels is None:
            labels = present.tolist()
        labels = np.asarray(labels)
        tp = np.array([np.sum(weights[(y_pred == c) & (y_true == c)]) for c in labels], dtype=float)
        fp = np.array([np.sum(weights[(y_pred == c) & (y_true != c)]) for c in labels], dtype=float)
        fn = np.array([np.sum(weights[(y_pred != c) & (y_true == c)]) for c in labels], dtype=float)
        if average == "micro":
            return {"f1": float(_f1(tp.sum(), fp.sum(), fn.sum()))}
        per_label = _f1(tp, fp, fn)
        if average is None:
            return {"f1": per_label.tolist()}
        if average == "weighted":
            support = tp + fn
            score = float(np.sum(per_label * support) / support.sum()) if support.sum() > 0 else 0.0
            return {"f1": score}
        return {"f1": float(per_label.mean()) if len(per_label) else 0.0}
