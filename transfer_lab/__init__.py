"""transfer_lab: reproducible research on moving knowledge between neural networks."""

__version__ = "0.1.0"

# the run's config schema must be in Hydra's ConfigStore before conf/train.yaml is composed
# (by the CLI, the tests' compose API, or any tool): importing the package registers it
from transfer_lab import config as _config  # noqa: E402

_config.register()
