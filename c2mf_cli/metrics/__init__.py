"""Metric families for concept dictionaries, one module each (METHOD.md section 4).

importance (Grad-CAM, Integrated Gradients on codes), insertion (concept insertion/deletion curves),
similarity (|Pearson|, |cosine| between concepts), reconstruction (per-class accuracy, MSE, R^2),
ood (crops as out-of-distribution), clustering (the multi-class ablation), recovery (planted ground truth).
Pure functions on tensors/arrays: they know nothing of stores, models or the terminal.
"""

from .clustering import ClusteredDictionary, KMeansResult, cluster_concepts, kmeans
from .importance import IGResult, gradcam, integrated_gradients, ranking
from .insertion import CurveResult, InsertionDeletion, insertion_deletion
from .ood import confidence_histograms, max_softmax, ood_scores
from .reconstruction import FitAccumulator, consistency, fit_quality, per_class_accuracy
from .recovery import binarize, gate_selection_accuracy, heatmap_mask_iou, iou, matched_cosine
from .similarity import concept_similarity, pairwise_similarity

__all__ = [
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
]
