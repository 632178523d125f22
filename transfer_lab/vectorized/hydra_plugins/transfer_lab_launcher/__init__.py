"""Hydra plugin package ``hydra_plugins.transfer_lab_launcher`` (the ``vectorized`` launcher).

Hydra finds launchers only by scanning the ``hydra_plugins`` namespace package, so pyproject maps
``hydra_plugins`` onto this package's parent directory (``transfer_lab/vectorized/hydra_plugins``,
deliberately without an ``__init__.py``): a wheel installs it as ``site-packages/hydra_plugins/``,
and an editable install lists the directory as a real portion of the namespace's ``__path__``,
which Hydra's ``pkgutil`` scan can list (a mapping of the subpackage alone cannot be listed).
"""
