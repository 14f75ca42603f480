#!/usr/bin/env python
"""Distil a fine-tuned teacher (typically the ViT) into a smaller student (typically a ResNet).

    accelerate launch run_distill.py --teacher_model_name_or_path runs/vit --student resnet18
    python run_distill.py --dataset_name digits --teacher_model_name_or_path runs/resnet18-digits \
        --student mobilenetv3-small --from_scratch --image_size 32        # offline: the README's walkthrough

`--help` lists every flag (all TrainingArguments flags work); the logic lives in hf_transfer/.
"""

if __name__ == "__main__":  # the flags are checked before torch and transformers are imported (hf_transfer.cli)
    from hf_transfer.cli import cli

    cli("distill")
else:  # imported: `main(argv)` for callers in Python (the tests)
    from hf_transfer.cli.distill import main

    __all__ = ["main"]
