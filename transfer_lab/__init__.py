"""transfer_lab: reproducible research on moving knowledge between neural networks."""

__version__ = "0.1.0"
