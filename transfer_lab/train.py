"""Entry point: ``python -m transfer_lab.train [overrides]`` (console script ``transfer-lab``)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer_lab.data.datamodule import ConfigError

log = logging.getLogger("transfer_lab")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from transfer_lab.run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    try:
        res = run(cfg, hc.runtime.output_dir, choices)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = res["metrics"]
    src = res["source"]
    print(f"[{res['strategy']} seed={res['seed']}] target test/acc={m['test/acc']:.4f} "
          f"source test/acc={src.get('test/acc', float('nan')):.4f} "
          f"cache_hit={src.get('cache_hit')} params trainable={res['params']['trainable']:,}"
          f"/{res['params']['total']:,} time={res['timings']['total_s']:.1f}s", flush=True)
    return m["test/acc"]


if __name__ == "__main__":
    main()
