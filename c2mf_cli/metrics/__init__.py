"""Metric families for concept dictionaries, one module each (docs/metrics.md gives each formula).

importance (Grad-CAM, Integrated Gradients, total Sobol indices on codes), insertion (concept insertion/deletion curves),
similarity (|Pearson|, |cosine| between concepts), reconstruction (per-class accuracy, MSE, R^2),
ood (crops as out-of-distribution), clustering (the multi-class ablation), recovery (planted ground truth),
significance (paired exact McNemar tests). Pure functions on tensors/arrays: they know nothing of stores, models
or the terminal.

`EVALUATE_METRICS` is the list evaluate iterates: each entry follows `_common.Metric` (built per dictionary, fed
every `_common.Batch`, asked once for its JSON entries). A new metric is one class in its own file and one line
here; order matters only where a metric reads what an earlier one left in `batch.shared` (insertion/deletion
ranks concepts by the importance computed just before it).
"""

from ._common import Batch, Metric, Settings, State
from .clustering import ClusteredDictionary, KMeansResult, cluster_concepts, kmeans
from .importance import (DEFAULT_RANKINGS, RANKING_LABELS, RANKINGS, IGResult, ImportanceMetric, gradcam, integrated_gradients,
                         ranking, sobol)
from .insertion import CurveResult, InsertionDeletion, InsertionDeletionMetric, insertion_deletion
from .ood import confidence_histograms, max_softmax, ood_scores
from .reconstruction import (FitAccumulator, FitMetric, ReconstructionMetric, consistency, fit_quality,
                             per_class_accuracy)
from .recovery import binarize, gate_selection_accuracy, heatmap_mask_iou, iou, matched_cosine
from .significance import ALPHA, mcnemar_exact, pairwise_mcnemar
from .similarity import SimilarityMetric, concept_similarity, pairwise_similarity

EVALUATE_METRICS: tuple[type[Metric], ...] = (
    SimilarityMetric,
    ReconstructionMetric,
    FitMetric,
    ImportanceMetric,
    InsertionDeletionMetric,
)

__all__ = [
    "ALPHA",
    "DEFAULT_RANKINGS",
    "RANKING_LABELS",
    "RANKINGS",
    "Batch",
    "EVALUATE_METRICS",
    "FitMetric",
    "ImportanceMetric",
    "InsertionDeletionMetric",
    "Metric",
    "ReconstructionMetric",
    "Settings",
    "State",
    "SimilarityMetric",
    "mcnemar_exact",
    "pairwise_mcnemar",
    "ClusteredDictionary",
    "CurveResult",
    "FitAccumulator",
    "IGResult",
    "InsertionDeletion",
    "KMeansResult",
    "binarize",
    "cluster_concepts",
    "concept_similarity",
    "confidence_histograms",
    "consistency",
    "fit_quality",
    "gate_selection_accuracy",
    "gradcam",
    "heatmap_mask_iou",
    "insertion_deletion",
    "integrated_gradients",
    "iou",
    "kmeans",
    "matched_cosine",
    "max_softmax",
    "ood_scores",
    "pairwise_similarity",
    "per_class_accuracy",
    "ranking",
    "sobol",
]
