"""Transfer learning for image classification with the Hugging Face Trainer.

One module per concept, in folders that show the layers (a layer imports only from those below it):

cli/ (entry points)
  cli/finetune.py, cli/distill.py   run_finetune.py's and run_distill.py's main: parse, then run the pipeline
  cli/tools.py                 `python -m hf_transfer push|report|check-config|export|predict|search`
  cli/command_line.py          the flags checked before torch/transformers are imported (a typo refused at once), from
                               command_line_flags.py, generated from the real parsers
config/ (one resolved, frozen configuration per run)
  config/flags.py              model and data flags (frozen dataclasses), the parser, arguments files
  config/run_config.py         RunConfig: every flag parsed once, the checkpoint, family, recipe and augmentation they
                               name resolved once; what run_args.json records and the tools read back
  config/recipes.py            optimiser and schedule defaults per model family and optimiser
  config/fitting.py            the defaults fitted to the data (batch size, length, metric, workers): values, no changes
run/ (one run: its pipeline and what it leaves in its output folder)
  run/pipeline.py              FineTune, Evaluate, Distill: the steps in order; distillation overrides a few
  run/assembly.py              the data loaded, the Trainer's parts (callbacks, collator, metrics, class weights)
  run/results.py               train, keep the best checkpoint, test once, write results and card, save, push
  run/output_dir.py            what the output directory holds for a new command; the run's record written into it
  run/record.py                run_args.json: what a run used (fitted values included), compared when its directory
                               is used again; which fields shape training (field metadata)
  run/checkpoints.py           which checkpoint to resume from; stopping cleanly on SIGTERM
  run/card.py                  the README.md of every output directory
tasks/ (what is learnt and how it is scored)
  tasks/classification.py      one class or several labels per image: label ids, loss, targets, metrics (and which
                               can choose a checkpoint), threshold, test report, problem_type
  tasks/losses.py              the distillation loss, soft-target cross-entropy, class weights (pure functions)
  tasks/metrics.py             accuracy, precision, recall, F1, top-5, per-class report, confusion matrix; mAP and F1
                               at a threshold for several labels per image
data/ (the CPU side, per sample, uint8)
  data/sources.py              what a data set name or folder is (built-in, class folders, save_to_disk, data files,
                               Hub id), opened whole, streamed or as unlabeled images; the built-in digits
  data/dataset.py              the data set in memory: its image and label columns, labels and splits
  data/decoding.py             one stored image -> uint8 RGB tensor
  data/augmentation.py         per-sample training augmentation
  data/samples.py              per-sample transform and batch collation for the DataLoader (one resize per model)
  data/batch.py                the batch between data/ and trainers/: its keys, and batch -> one model's input
  data/unlabeled.py            images without labels for distillation: loading, checks, joining the training split
  data/streaming.py            --streaming: the train split read a shard at a time, in an order a checkpoint can resume
on_device/ (per batch, on the training device)
  on_device/preprocessing.py   uint8 batch -> one model's input (ImageSpec)
  on_device/geometry.py        random crops and flips of a whole batch, one draw per image
  on_device/mixing.py          mixup and CutMix
models/
  models/presets.py            the checkpoints --model names
  models/loading.py            loading a checkpoint with a new head; the model family
  models/structure.py          a backbone's stem, blocks and head
trainers/
  trainers/transfer_config.py  TransferConfig: the fine-tuning trainer's TrainingArguments (frozen once resolved)
  trainers/transfer_trainer.py TransferTrainer: the Trainer fed uint8 batches
  trainers/distillation_config.py, trainers/distillation_trainer.py   the same for distillation
  trainers/freezing.py         freezing and progressive unfreezing
  trainers/optimizer.py        parameter groups (per-layer learning rates, weight decay), step decay
  trainers/ema.py              weight EMA (--ema_decay), kept beside the model and saved with checkpoints
  trainers/nonfinite.py        the NaN/inf loss and gradient guard (stop, or skip a step as if it never happened)
  trainers/batchnorm.py        precise BatchNorm statistics for the weights evaluated and saved
  trainers/selection.py        which checkpoint a run keeps: ties on the metric broken, what the run says about it
integrations/ (the libraries and services around a run)
  integrations/hub.py          pushing a run to the Hugging Face Hub
  integrations/tracking.py     W&B configuration, throughput and peak memory
  integrations/launch.py       checks of the launch and of accelerate config files
  integrations/compat.py       every workaround of a library internal, with its versions
tools/ (whole tools on finished runs)
  tools/search.py              hyperparameter search (optuna, Ray): each trial a run of the pipeline, the study resumable
  tools/export.py              ONNX export, checked against PyTorch on the run's test images
  tools/openvino_ir.py         --openvino: the ONNX file converted for OpenVINO (Intel CPUs), checked the same way
  tools/predict.py             the exported ONNX file on image files, with the preprocessing its metadata holds
  tools/report.py              comparison of finished runs
errors.py                      one-line user errors
"""

__version__ = "0.1.0"
