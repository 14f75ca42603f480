"""Transfer learning for image classification with the Hugging Face Trainer.

Modules, one concept each:
  arguments     command-line dataclasses, recipes, checks of the numbers
  data          loading, columns, splits, uint8 sample transforms and collation
  augment       per-sample training augmentation presets (CPU, uint8) and batch mixup/CutMix
  transforms    what a checkpoint expects (ImageSpec) and the device-side batch preprocessing
  models        presets, checkpoint loading, classification head, input size, depth groups
  metrics       accuracy/precision/recall/F1/top-5, per-class report, confusion matrix
  losses        the distillation loss and soft-target cross-entropy (pure functions)
  trainer       TransferTrainer: the Trainer fed uint8 batches
  distillation  DistillationTrainer: the teacher and its loss
  freezing      freezing and progressive unfreezing
  optimization  parameter groups (per-layer learning rates, weight decay) and step decay
  checkpoints   which checkpoint to resume from; stopping cleanly on SIGTERM
  distributed   checks of the launch and of accelerate config files
  tracking      W&B configuration, throughput and peak memory of a run
  hub           pushing a run to the Hugging Face Hub
  model_card    the README.md written into every output directory
  report        comparison of finished runs
  training      the one training path both scripts share
  finetune      run_finetune.py's main
  distill       run_distill.py's main
  __main__      `python -m hf_transfer push|report|check-config`
"""

__version__ = "0.1.0"
