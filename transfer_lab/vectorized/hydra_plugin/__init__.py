"""Hydra plugin package, installed as ``hydra_plugins.transfer_lab_launcher`` (Hydra discovers
launchers in the ``hydra_plugins`` namespace package; see pyproject's package-dir mapping)."""
