#!/usr/bin/env python
"""Benchmark: the project's training step against the model alone and against the transformers-example
pipeline, at several DataLoader worker counts, and the cost of the Trainer and of distillation. Runs
on the CPU here and on a GPU when there is one.

    python benchmarks/benchmark.py                       # CPU defaults: ViT (patch 16, width 64, 2 blocks), 224 px
    python benchmarks/benchmark.py --width 32 --depth 1  # the lighter model, where the data path weighs more
    python benchmarks/benchmark.py --bf16 --batch_size 256 --workers 0,4,8 --width 192 --depth 12   # a GPU

Every measurement runs in a fresh process (so peak memory is its own), in interleaved rounds, each
in its own seeded random order, so that machine drift and one mode's after-effects hit every mode
alike; the medians are reported.
All modes share the local CIFAR-shaped data set (32x32 PNGs, made here), the model built from
a config (random weights), batch size and step count.

Modes:
  alone      the model alone: float batches made beforehand at 224 px, the same forward, backward,
             AdamW and clipping; the limit any data path can only approach (no DataLoader)
  reference  the transformers example's way: set_transform with RandomResizedCrop(224),
             RandomHorizontalFlip, ToTensor, Normalize per sample on the CPU; a plain Trainer
  project    run_finetune's path: images decoded once, uint8 batches, crops and flips, resize and
             normalisation batched on the device
  plain      the same batches and model as `project` in a hand-written PyTorch loop
  distill    DistillationTrainer: teacher forward + student step (the student is `project`'s model)
  teacher    the teacher's forward alone over the same batches
`reference` and `project` run at every worker count of --workers; the other modes at the first.
Prints one JSON object: images/s of each mode, the project as a fraction of the model alone at each
worker count (goal >= 0.95), its ratio to the reference's best worker count, eval images/s, peak
memory, and the data-wait share of the project's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = ("alone", "reference", "project", "plain", "distill", "teacher")
PER_WORKER_COUNT = ("reference", "project")


# ---------------------------------------------------------------- shared set-up


def make_dataset(path: Path, n_train: int, n_eval: int) -> None:
    """CIFAR-shaped: 32x32 RGB PNGs (noise), 10 classes, CIFAR-10's column names."""
    import numpy as np
    import PIL.Image
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    rng = np.random.default_rng(0)
    features = Features({"img": Image(), "label": ClassLabel(names=[f"c{i}" for i in range(10)])})

    def split(n):
        images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        return Dataset.from_dict({"img": images, "label": (np.arange(n) % 10).tolist()}, features=features)

    DatasetDict(train=split(n_train), validation=split(n_eval), test=split(n_eval)).save_to_disk(str(path))


def make_checkpoints(root: Path, image_size: int, width: int = 32, depth: int = 1) -> dict[str, str]:
    """Student and teacher ViTs (patch 16) from configs, saved like any checkpoint (random weights).
    The teacher is twice as wide and deep as the student."""
    from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessor

    paths = {}
    for name, (hidden, layers) in {"student": (width, depth), "teacher": (2 * width, 2 * depth)}.items():
        config = ViTConfig(image_size=image_size, patch_size=16, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=max(2, hidden // 64), intermediate_size=hidden * 2, num_labels=10,
                           id2label={i: f"c{i}" for i in range(10)}, label2id={f"c{i}": i for i in range(10)})
        path = root / name
        AutoModelForImageClassification.from_config(config).save_pretrained(path)
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
        paths[name] = str(path)
    return paths


def training_args(cfg: dict, output_dir: str, **overrides):
    from hf_transfer.trainers.distillation_config import DistillationConfig

    values = dict(output_dir=output_dir, per_device_train_batch_size=cfg["batch_size"],
                  per_device_eval_batch_size=cfg["batch_size"] * 2, max_steps=cfg["steps"],
                  dataloader_num_workers=cfg["workers"], eval_strategy="no", save_strategy="no",
                  load_best_model_at_end=False, report_to="none", disable_tqdm=True, logging_steps=10_000,
                  optim="adamw_torch", learning_rate=1e-4, bf16=cfg["bf16"], seed=0)
    values.update(overrides)
    return DistillationConfig(**values)  # a TransferConfig with the distillation defaults on top


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


# ---------------------------------------------------------------- the modes (one per process)


def run_reference(cfg: dict) -> dict:
    """The transformers example's pipeline: per-sample float transforms on the CPU, default collation."""
    import torch
    from datasets import load_from_disk
    from torchvision import transforms
    from transformers import AutoModelForImageClassification, Trainer

    from hf_transfer.integrations.tracking import ThroughputCallback

    data = load_from_disk(cfg["data"])
    size = cfg["image_size"]
    normalize = transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                  normalize])

    def with_tf(tf):
        def apply(batch):
            batch["pixel_values"] = [tf(image.convert("RGB")) for image in batch["img"]]
            return batch
        return apply

    data["train"].set_transform(with_tf(train_tf))
    data["validation"].set_transform(with_tf(eval_tf))

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples])}

    timer = ThroughputCallback()
    trainer = Trainer(model=AutoModelForImageClassification.from_pretrained(cfg["student"]),
                      args=training_args(cfg, cfg["out"], remove_unused_columns=False), train_dataset=data["train"],
                      eval_dataset=data["validation"], data_collator=collate, callbacks=[timer])
    trainer.train()
    evaluation = trainer.evaluate()
    return {**timer.summary(), "eval_images_per_second": evaluation["eval_samples_per_second"]}


def project_trainer(cfg: dict, teacher: bool = False):
    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.data.samples import attach_transforms
    from hf_transfer.models.loading import load_model, load_teacher
    from hf_transfer.run.assembly import trainer_kwargs
    from hf_transfer.trainers.distillation_trainer import DistillationTrainer
    from hf_transfer.trainers.transfer_trainer import TransferTrainer

    data = load_image_data(cfg["data"])
    attach_transforms(data, "basic")
    student = load_model(cfg["student"], data.label_names)
    kwargs = trainer_kwargs(training_args(cfg, cfg["out"]), data, student)
    if not teacher:
        return TransferTrainer(**kwargs)
    loaded = load_teacher(cfg["teacher"], data.label_names)
    return DistillationTrainer(teacher=loaded.model, teacher_spec=loaded.spec, **kwargs)


def timer_of(trainer):
    from hf_transfer.integrations.tracking import ThroughputCallback

    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback))


def run_project(cfg: dict, teacher: bool = False) -> dict:
    trainer = project_trainer(cfg, teacher=teacher)
    trainer.train()
    evaluation = trainer.evaluate()
    return {**timer_of(trainer).summary(), "eval_images_per_second": evaluation["eval_samples_per_second"]}


def run_plain(cfg: dict, what: str = "plain") -> dict:
    """A hand-written loop over the project's batches: the floor the Trainer is measured against.

    what="plain": student training step; "teacher": teacher forward only (no gradients).
    """
    import torch

    trainer = project_trainer(cfg, teacher=(what == "teacher"))
    model = trainer.teacher if what == "teacher" else trainer.model
    to_input = trainer.teacher_input if what == "teacher" else trainer.to_model_input
    device = trainer.args.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"])
    loader = trainer.get_train_dataloader()
    warmup, steps, start, done = 5, cfg["steps"], None, 0
    while done < steps:
        for batch in loader:
            if done == warmup:
                start = time.perf_counter()
            images, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
            with autocast:
                if what == "teacher":
                    with torch.no_grad():
                        model(pixel_values=to_input(images)).logits.float().sum().item()
                else:
                    model.train()
                    loss = torch.nn.functional.cross_entropy(model(pixel_values=to_input(images)).logits.float(), labels)
            if what != "teacher":
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss.item()  # the Trainer reads the loss every step too
            done += 1
            if done == steps:
                break
    elapsed = time.perf_counter() - start
    return {"steady_images_per_second": round((steps - warmup) * cfg["batch_size"] / elapsed, 2)}


def run_alone(cfg: dict) -> dict:
    """The model alone: the same model, optimizer and clipping as the project's run, on float batches made
    beforehand at the model's input size. The limit any data path can only approach."""
    import torch

    from hf_transfer.models.loading import load_model

    loaded = load_model(cfg["student"], [f"c{i}" for i in range(10)])
    model = loaded.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"])
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(cfg["batch_size"], 3, *loaded.spec.size, generator=generator).to(device),
                torch.randint(0, 10, (cfg["batch_size"],), generator=generator).to(device)) for _ in range(4)]
    warmup, steps, start = 5, cfg["steps"], None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        images, labels = batches[step % len(batches)]
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the Trainer reads the loss every step too
    elapsed = time.perf_counter() - start
    return {"steady_images_per_second": round((steps - warmup) * cfg["batch_size"] / elapsed, 2)}


def run_mode(mode: str, cfg: dict) -> dict:
    if cfg["threads"]:
        import torch

        torch.set_num_threads(cfg["threads"])
    result = {"reference": run_reference, "project": run_project, "plain": run_plain, "alone": run_alone,
              "distill": lambda c: run_project(c, teacher=True), "teacher": lambda c: run_plain(c, "teacher")}[mode](cfg)
    return {**result, "peak_memory_mb": round(peak_memory_mb(), 1)}


# ---------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every mode")
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement (5 are warm-up)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts for reference and project")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64, help="hidden size of the student ViT (teacher: twice)")
    parser.add_argument("--depth", type=int, default=2, help="blocks of the student ViT (teacher: twice)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # one measurement, in this fresh process
        print("RESULT " + json.dumps(run_mode(args.worker, json.loads(args.config))))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    modes = args.modes.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="hf-transfer-bench-") as tmp:
        tmp = Path(tmp)
        n_train = args.batch_size * (args.steps + 5)
        make_dataset(tmp / "data", n_train=n_train, n_eval=args.batch_size * 8)
        base = {"data": str(tmp / "data"), "out": str(tmp / "out"), "steps": args.steps,
                "batch_size": args.batch_size, "image_size": args.image_size, "bf16": args.bf16,
                "threads": args.threads, **make_checkpoints(tmp, args.image_size, args.width, args.depth)}
        plan = [(mode, workers) for mode in modes
                for workers in (worker_counts if mode in PER_WORKER_COUNT else worker_counts[:1])]
        runs: dict[str, list[dict]] = {}
        for round_number in range(args.rounds):
            # A new order every round (seeded): a mode that leaves the machine busier or hotter (worker
            # processes exiting) would otherwise always slow the same next one.
            for mode, workers in random.Random(round_number).sample(plan, len(plan)):
                cfg = {**base, "workers": workers}
                proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--config", json.dumps(cfg)],
                                      capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
                key = f"{mode}@{workers}" if mode in PER_WORKER_COUNT else mode
                runs.setdefault(key, []).append(json.loads(line[len("RESULT "):]))
                if args.output:  # after every measurement, so a run cut short keeps what it measured
                    Path(args.output).write_text(json.dumps(summarize(runs, args), indent=2) + "\n")
    print(json.dumps(summarize(runs, args), indent=2))


def summarize(runs: dict[str, list[dict]], args) -> dict:
    """`runs`: measurements per mode, keyed `mode@workers` for the modes measured at each worker count."""
    import platform

    import torch

    def median(key, field):
        values = [r[field] for r in runs.get(key, []) if field in r]
        return round(statistics.median(values), 2) if values else None

    ips = {key: median(key, "steady_images_per_second") for key in runs}
    workers = sorted({int(key.split("@")[1]) for key in runs if "@" in key})
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "setup": {"model": f"ViT patch 16, width {args.width}, depth {args.depth} (teacher x2)",
                  "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                  "workers": workers, "rounds": args.rounds, "order": "shuffled per round (seed: the round)",
                  "bf16": args.bf16},
        "train_images_per_second": ips,
        # every round's figure, so the spread between rounds can be read beside the medians
        "train_images_per_second_rounds": {key: [r.get("steady_images_per_second") for r in values]
                                           for key, values in runs.items()},
        "eval_images_per_second": {k: median(k, "eval_images_per_second") for k in runs
                                   if median(k, "eval_images_per_second")},
        "peak_memory_mb": {k: median(k, "peak_memory_mb") for k in runs},
        "project_data_wait_share": {w: median(f"project@{w}", "data_wait_share") for w in workers},
    }
    if ips.get("alone"):
        out["project_of_model_alone"] = {w: round(ips[f"project@{w}"] / ips["alone"], 3) for w in workers
                                         if ips.get(f"project@{w}")}  # goal >= 0.95 at every count
    references = [ips[f"reference@{w}"] for w in workers if ips.get(f"reference@{w}")]
    projects = [ips[f"project@{w}"] for w in workers if ips.get(f"project@{w}")]
    if references and projects:
        out["project_vs_best_reference"] = round(max(projects) / max(references), 2)
    first = workers[0] if workers else None
    if ips.get("plain") and ips.get(f"project@{first}"):
        out["trainer_overhead"] = round(ips["plain"] / ips[f"project@{first}"] - 1, 3)  # goal <= 0.10
    if ips.get("distill") and ips.get("teacher") and ips.get(f"project@{first}"):
        parts = 1 / ips["teacher"] + 1 / ips[f"project@{first}"]  # seconds per image of the two parts alone
        out["distill_vs_parts"] = round((1 / ips["distill"]) / parts, 3)  # goal <= 1.15
    return out


if __name__ == "__main__":
    main()
