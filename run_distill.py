#!/usr/bin/env python
"""Distil a fine-tuned teacher (typically the ViT) into a smaller student (typically a ResNet).

    accelerate launch run_distill.py --teacher_model_name_or_path runs/vit --student resnet18
    python run_distill.py --teacher_model_name_or_path runs/digits-teacher --dataset_name digits \
        --student resnet18 --from_scratch --image_size 32                 # offline

`--help` lists every flag (all TrainingArguments flags work); the logic lives in hf_transfer/.
"""

from hf_transfer.distill import cli, main

__all__ = ["main"]

if __name__ == "__main__":
    cli()
