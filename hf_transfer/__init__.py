"""Transfer learning for image classification with the Hugging Face Trainer.

Modules, one concept each:
  arguments    command-line dataclasses, recipes, checks
  data         loading, columns, splits, uint8 sample transforms and collation
  augment      per-sample training augmentation presets (CPU, uint8)
  transforms   what a checkpoint expects (ImageSpec) and the device-side batch preprocessing
  models       presets, checkpoint loading, classification head, input size
  metrics      accuracy/precision/recall/F1/top-5, per-class report, confusion matrix
  trainer      TransferTrainer: the Trainer fed uint8 batches
  training     the one training path: output dir, train, evaluate, test, save
  model_card   the README.md written into every output directory
  finetune     run_finetune.py's main
"""

__version__ = "0.1.0"
