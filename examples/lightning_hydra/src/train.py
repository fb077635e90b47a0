"""Train the digits model: lightning-hydra-template's src/train.py, trimmed to what this example uses.

`python src/train.py` trains once; `python src/train.py -m hparams_search=searchlab` tunes it with searchlab's
Hydra sweeper. The task function returns the optimized metric, which the sweeper takes as the trial's value.
"""

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig

# The project root on the import path, so `src.` targets resolve however the script is started (what LHT's
# rootutils.setup_root does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.utils.instantiators import instantiate_callbacks  # noqa: E402

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info(f"Instantiating model <{cfg.model._target_}>")
    model: LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks: list[Callback] = instantiate_callbacks(cfg.get("callbacks"))
    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks, "trainer": trainer}
    if cfg.get("train"):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metric_dict = dict(trainer.callback_metrics)
    if cfg.get("test"):
        trainer.test(model=model, datamodule=datamodule)
        metric_dict.update(trainer.callback_metrics)
    return metric_dict, objects


def get_metric_value(metric_dict: dict[str, Any], metric_name: str | None) -> float | None:
    if not metric_name:
        log.info("Metric name is None! Skipping metric value retrieval...")
        return None
    if metric_name not in metric_dict:
        raise Exception(f"Metric value not found! <metric_name={metric_name}>\n"
                        "Make sure metric name logged in LightningModule is correct!\n"
                        "Make sure `optimized_metric` name in `hparams_search` config is correct!")
    return metric_dict[metric_name].item()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metric_dict, _ = train(cfg)
    return get_metric_value(metric_dict, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
