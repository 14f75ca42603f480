"""Transfer learning for image classification with the Hugging Face Trainer.

One module per concept:
  commands/finetune.py         run_finetune.py's main, top to bottom
  commands/distill.py          run_distill.py's main, top to bottom
  commands/tools.py            `python -m hf_transfer push|report|check-config|export|search`
  arguments.py                 model and data flags; parsing once, with the recipe as defaults
  command_line.py              the flags checked before torch/transformers are imported (a typo refused at once), from
                               command_line_flags.py, generated from the real parsers
  recipes.py                   optimiser and schedule defaults per model family and optimiser; defaults fitted to the data
  workflow.py                  the steps both commands share: setup checks, loading, the trainer's parts, train, test, save
  output_dir.py                what the output directory holds for a new command; the run's arguments written into it
  data/dataset.py              data sets, their image and label columns, their splits
  data/decoding.py             one stored image -> uint8 RGB tensor
  data/augmentation.py         per-sample training augmentation (CPU, uint8)
  data/samples.py              per-sample transform and batch collation for the DataLoader (one resize per model)
  data/unlabeled.py            images without labels for distillation: loading, checks, joining the training split
  data/streaming.py            --streaming: the train split read a shard at a time, in an order a checkpoint can resume
  on_device/preprocessing.py   uint8 batch -> one model's input, on the training device (ImageSpec)
  on_device/geometry.py        random crops and flips of a whole batch on the device, one draw per image
  on_device/mixing.py          mixup and CutMix on the device
  models/presets.py            the checkpoints --model names
  models/loading.py            loading a checkpoint with a new head; the model family
  models/structure.py          a backbone's stem, blocks and head
  trainers/transfer_config.py  TransferConfig: the fine-tuning trainer's TrainingArguments
  trainers/transfer_trainer.py TransferTrainer: the Trainer fed uint8 batches
  trainers/distillation_config.py, trainers/distillation_trainer.py   the same for distillation
  trainers/freezing.py         freezing and progressive unfreezing
  trainers/optimizer.py        parameter groups (per-layer learning rates, weight decay), step decay
  trainers/ema.py              weight EMA (--ema_decay), kept beside the model and saved with checkpoints
  trainers/nonfinite.py        the NaN/inf loss and gradient guard (stop, or skip a step as if it never happened)
  trainers/batchnorm.py        precise BatchNorm statistics for the weights evaluated and saved
  trainers/selection.py        which checkpoint a run keeps: ties on the metric broken, what the run says about it
  losses.py                    the distillation loss, soft-target cross-entropy, class weights (pure functions; images
                               without labels add to the distillation term only)
  metrics.py                   accuracy, precision, recall, F1, top-5, per-class report, confusion matrix; mAP and F1
                               at a threshold for several labels per image
  checkpoints.py               which checkpoint to resume from; stopping cleanly on SIGTERM
  run_args.py                  run_args.json: what a run used (fitted values included), compared when its directory
                               is used again; which fields shape training (field metadata)
  launch.py                    checks of the launch and of accelerate config files
  tracking.py                  W&B configuration, throughput and peak memory
  hub.py                       pushing a run to the Hugging Face Hub
  model_card.py                the README.md of every output directory
  report.py                    comparison of finished runs
  export.py                    ONNX export, checked against PyTorch on the run's test images
  search.py                    hyperparameter search (optuna): each trial an ordinary run, the study resumable
  tasks.py                     one class or several labels per image: label ids, loss, targets, metrics (and which
                               can choose a checkpoint), threshold, test report, problem_type
  compat.py                    every workaround of a library internal, with its versions
  errors.py                    one-line user errors
"""

__version__ = "0.1.0"
