#!/usr/bin/env python
"""Fine-tune a pretrained ResNet or ViT on CIFAR-10 (or any image-classification data set).

    accelerate launch run_finetune.py --model resnet50
    python run_finetune.py --model vit --bf16
    python run_finetune.py --dataset_name digits --model resnet18 --from_scratch   # offline

`--help` lists every flag (all TrainingArguments flags work); the logic lives in hf_transfer/.
"""

if __name__ == "__main__":  # the flags are checked before torch and transformers are imported (hf_transfer.cli)
    from hf_transfer.cli import cli

    cli("finetune")
else:  # imported: `main(argv)` for callers in Python (the tests)
    from hf_transfer.cli.finetune import main

    __all__ = ["main"]
