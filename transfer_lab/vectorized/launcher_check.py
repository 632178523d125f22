"""A Hydra callback of ``hydra/launcher=vectorized``: is the launcher plugin installed?

Hydra instantiates a launcher only if its scan of the ``hydra_plugins`` namespace found it, which
needs the project installed (``pip install -e .``: pyproject maps ``hydra_plugins`` into
``transfer_lab/vectorized/``). A checkout on ``PYTHONPATH`` alone, or an install made before the
mapping existed, has no plugin; Hydra's own message then is "Unknown plugin class". This callback
runs before Hydra builds the launcher: asked for on the command line, a missing plugin is one line
and exit code 2; selected otherwise (a preset, the defaults list), the sweep runs with Hydra's
basic launcher (one cell at a time) and says so once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger("transfer_lab")
PLUGIN = "hydra_plugins.transfer_lab_launcher.vectorized_launcher.VectorizedLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
HOW = ("install the project so Hydra finds the launcher: pip install -e . (from the repository root; "
       "re-run it after updating an older install)")


def installed() -> bool:
    """Whether Hydra's plugin scan found the vectorized launcher."""
    return any(f"{c.__module__}.{c.__name__}" == PLUGIN for c in Plugins.instance().discover(Launcher))


class LauncherInstalled(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.hydra.launcher.get("_target_")) != PLUGIN or installed():
            return
        asked = any(o.replace(" ", "").startswith("hydra/launcher=vectorized")
                    for o in config.hydra.overrides.hydra)
        if asked:
            print(f"error: hydra/launcher=vectorized: the launcher plugin is not installed; {HOW}",
                  file=sys.stderr, flush=True)
            sys.exit(2)
        log.warning("vectorised seeds are off (the vectorized launcher plugin is not installed; %s): "
                    "cells run one at a time", HOW)
        with read_write(config), open_dict(config):  # the object Hydra builds the launcher from next
            config.hydra.launcher = {"_target_": BASIC}
