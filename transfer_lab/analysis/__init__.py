"""Why a transfer worked: representation similarity (CKA), weight drift, transferability
scores before training (LogME, LEEP), source ranking (Kendall's τ), per-class metrics.

Reading results: ``collect`` (the one results.json loader) and ``aggregate`` (the one grouping rule
and mean ± std / CI) serve both ``transfer_lab.report`` and ``transfer_lab.analyze``; ``paired``,
``effective_labels`` and ``comparison`` are the report's statistics and protocol."""

from transfer_lab.analysis.cka import cka_matrix, default_layers, layer_features, linear_cka
from transfer_lab.analysis.drift import relative_drift
from transfer_lab.analysis.metrics import class_metrics, predict
from transfer_lab.analysis.ranking import kendall_tau, rank_table
from transfer_lab.analysis.transferability import leep, logme, transferability

__all__ = ["cka_matrix", "class_metrics", "default_layers", "kendall_tau", "layer_features", "leep",
           "linear_cka", "logme", "predict", "rank_table", "relative_drift", "transferability"]
