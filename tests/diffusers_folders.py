"""Write diffusers pipeline folders of tiny random models for tests (what ``save_pretrained`` of a pipeline writes)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch import nn


def write_folder(root: Path, unet: nn.Module, vae: nn.Module, encoders: Mapping[str, nn.Module], xl: bool,
                 prediction: str = "epsilon") -> None:
    """``root/{unet,vae,text_encoder[_2],scheduler}`` and ``model_index.json`` (an Euler scheduler config)."""
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    unet.save_pretrained(root / "unet")  # type: ignore[operator]
    vae.save_pretrained(root / "vae")  # type: ignore[operator]
    for name, m in encoders.items():
        m.save_pretrained(root / name)  # type: ignore[operator]
        index[name] = ["transformers", type(m).__name__]
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    (root / "model_index.json").write_text(json.dumps(index))
