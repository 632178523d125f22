"""K seeds of one cell trained as one vectorised model (``torch.func`` model ensembling)."""

from transfer_lab.vectorized.data import NotVectorisable
from transfer_lab.vectorized.engine import SeedResult, check_group, fit_seeds
from transfer_lab.vectorized.module import VectorizedModule
from transfer_lab.vectorized.terms import vectorizable

__all__ = ["NotVectorisable", "SeedResult", "VectorizedModule", "check_group", "fit_seeds",
           "vectorizable"]
