"""`DistillationTrainer`: a TransferTrainer whose loss also pulls the student towards a frozen teacher.

Its config is `DistillationConfig` (`distillation_loss`, `alpha`, `temperature`, read from `self.args`).

What it adds to TransferTrainer, and why:
- `make_objective`: the distillation objective (tasks/objectives.py) in place of the task's loss, and
  `teacher_answers`, the teacher's logits it learns from; `TransferTrainer.compute_loss` does the rest (in
  evaluation the student alone is scored, as in fine-tuning). The teacher gets its own view of
  the batch (its input size, resize and normalisation), made from the same augmented and mixed
  images the student sees, so it grades exactly the picture the student was shown ("consistent
  teaching"), at its own resolution: images of one size are resized by each model on the device,
  a mixed-size batch once per model on the CPU (`samples.UInt8Collator`), never the teacher's
  input from the student's.
- `extra_test_metrics`: the teacher's test accuracy and the student-teacher agreement, each model predicting as
  it does on its own (with several labels per image, each at its own decision threshold).
- `evaluation_loop`: the validation evaluation also gives `eval_kd_loss`, the distillation term on the
  validation images, which chooses the checkpoint (trainers/selection.py).

The teacher is frozen (eval mode, no gradients, not in the optimizer) and lives beside the
model, not inside it, so it is never saved into the student's checkpoints or pushed.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.batch import Pictures, as_batch, model_input, pictures
from ..integrations.compat import dataset_fingerprint, deepspeed_dtype
from ..integrations.tracking import forward_flops
from ..models.loading import model_family
from ..on_device.preprocessing import ImageSpec, ToModelInput
from ..tasks.objectives import DISTILLATION_LOSSES, Distillation
from .transfer_trainer import TransferTrainer

logger = logging.getLogger(__name__)
TEACHER_VIEW = "teacher"
CACHE_PREFIX = "_teacher_logits-"  # the cache files in an output directory (output_dir.py keeps them)


class DistillationTrainer(TransferTrainer):
    """`teacher`: a fine-tuned classifier with the data set's labels; `teacher_spec`: the input it expects."""

    def __init__(self, *args, teacher: torch.nn.Module, teacher_spec: ImageSpec, **kwargs):
        # Mixed-size batches carry the teacher's own resize of each image (samples.UInt8Collator).
        kwargs["data_collator"] = kwargs["data_collator"].with_view(TEACHER_VIEW, teacher_spec)
        super().__init__(*args, **kwargs)
        self.teacher_input = ToModelInput(teacher_spec)
        self.teacher_task = self.task.of_model(teacher.config)  # several labels per image: the teacher's threshold
        self.teacher = self._prepare_teacher(teacher)
        self.teacher_logits: torch.Tensor | None = None  # (rows, classes), set by `use_cached_teacher_logits`
        self._teacher_validation: np.ndarray | None = None  # the teacher's validation logits (`judge`)
        self._teacher_flops: int | None = None

    def _prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            # DeepSpeed runs in its own dtype without autocast; a frozen teacher needs no engine
            # under ZeRO-1/2, only the same device and dtype as the student.
            return teacher.to(self.accelerator.device, dtype=deepspeed_dtype(self.accelerator))
        if self.is_fsdp_enabled:
            teacher.to(self.accelerator.device)  # prepare_model leaves placement to FSDP, which only shards the student
        if self.to_model_input.channels_last and model_family(teacher) == "cnn":
            # A CNN teacher on a GPU gets the student's channels-last layout: weights and its own input.
            teacher.to(memory_format=torch.channels_last)
            self.teacher_input.channels_last = True
        # On the device, with the run's autocast, and not wrapped in DDP (evaluation mode).
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def floating_point_ops(self, inputs: dict) -> int:
        """The student's training FLOPs plus the teacher's forward (none when its logits are cached)."""
        student = super().floating_point_ops(inputs)
        if self.teacher_logits is not None or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return student
        if self._teacher_flops is None:
            self._teacher_flops = forward_flops(self.teacher, self.teacher_input.spec.size)
        return student + self._teacher_flops * len(inputs["pixel_values"])

    def make_objective(self) -> Distillation:
        """(1 - alpha) * the task's loss + alpha * the distillation term `--distillation_loss` names
        (tasks/objectives.py)."""
        return DISTILLATION_LOSSES[self.args.distillation_loss](
            self.task, self.args.alpha, self.args.temperature, self.args.label_smoothing_factor, self.class_weights)

    def teacher_answers(self, inputs) -> torch.Tensor:
        """The teacher's logits for the training batch: cached per row, or computed from its own view of the images."""
        if self.teacher_logits is not None:
            return self.teacher_logits[inputs["row_index"].to(self.teacher_logits.device)]
        with torch.inference_mode():  # no autograd bookkeeping at all for the frozen teacher
            logits = self.teacher_logits_for(inputs["pictures"])
        return logits.clone()  # an ordinary tensor: the loss saves it for the backward pass

    def teacher_logits_for(self, images: Pictures) -> torch.Tensor:
        """The teacher's logits for a batch's pictures (`data/batch.py`): the student's (augmented, mixed) images,
        resized, cropped and normalised the teacher's own way; or, for a mixed-size batch, the teacher's own view of
        them, made by the collator (samples.UInt8Collator)."""
        pixels = model_input(images, self.teacher_input, TEACHER_VIEW)
        return self.teacher(pixel_values=self.cast_for_model(pixels)).logits

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The validation split's evaluation also gives `eval_kd_loss`: the distillation term of the training loss
        (T^2 KL to the teacher's softened answers) on its images, their labels unused, for the weights being
        scored (with EMA, the average's): the judge that chooses a distilled checkpoint (trainers/selection.py)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if metric_key_prefix == "eval" and output.predictions is not None:
            output.metrics[f"{metric_key_prefix}_kd_loss"] = self.judge(output.predictions)
        return output

    def judge(self, predictions) -> float:
        """The distillation term of the student's validation logits (in the split's order) against the teacher's."""
        student = predictions[0] if isinstance(predictions, tuple) else predictions
        if self._teacher_validation is None:  # the teacher is frozen and validation is not augmented: once
            # In its own random state: a DataLoader draws its seed from the global one, and a resumed run, which
            # computes this at its first evaluation after the resume, must draw the same numbers as an uninterrupted one.
            device = self.args.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self._teacher_validation = self.teacher_predict(self.eval_dataset, "teacher on the validation split")[1]
        student, teacher = torch.as_tensor(student).float(), torch.as_tensor(self._teacher_validation)
        return round(self.objective.term(student, teacher).item(), 6)

    @torch.inference_mode()
    def teacher_predict(self, dataset, description: str = "teacher") -> tuple[np.ndarray, np.ndarray]:
        """The teacher's logits and the row numbers for a (non-augmented) split, gathered from all processes."""
        all_rows, all_logits = [], []
        batches = tqdm(self.get_test_dataloader(dataset), desc=description, leave=False,
                       disable=self.args.disable_tqdm or not self.is_local_process_zero())
        for batch in batches:
            logits = self.teacher_logits_for(pictures(batch, augmented=False))
            rows, logits = self.accelerator.gather_for_metrics((as_batch(batch).row_index, logits.float()))
            all_rows.append(rows.cpu())
            all_logits.append(logits.cpu())
        return torch.cat(all_rows).numpy(), torch.cat(all_logits).numpy()

    def extra_test_metrics(self, dataset, output) -> dict[str, float]:
        """The teacher's test scores as its own evaluation gives them, and the share of test images on which the
        student predicts what the teacher does: the same class; with several labels per image, the same label set,
        each model's at its own decision threshold (the student's chosen on this run's validation split, the
        teacher's the one it was saved with: `test_teacher_threshold`; a calibrated teacher's on its logits from before
        the temperature, models/loading.py `uncalibrate`)."""
        _, teacher_logits = self.teacher_predict(dataset, "teacher on the test split")
        teacher = self.teacher_task.metrics(teacher_logits, output.label_ids)
        same = self.teacher_task.predictions(teacher_logits) == self.task.predictions(output.predictions)
        return {
            "test_teacher_accuracy": teacher["accuracy"],
            **({"test_teacher_map": teacher["map"], "test_teacher_f1": teacher["f1"],
                "test_teacher_threshold": teacher["threshold"]}
               if self.task.multi_label else {}),
            "test_agreement": float(same.reshape(len(same), -1).all(-1).mean()),
        }

    def use_cached_teacher_logits(self, dataset, path: Path) -> None:
        """Compute the teacher's logits for every training image once (or load them), and train from them.

        Only valid without augmentation: the cached logits are those of the unaugmented image. The output
        directory's other cache files (another teacher's, or older contents of the images: `teacher_cache_path`)
        are deleted: nothing will read them again.
        """
        if self.is_world_process_zero():
            for stale in path.parent.glob(f"{CACHE_PREFIX}*"):
                if stale.name != path.name:
                    stale.unlink()
                    logger.info("deleted the teacher-logit cache %s (another teacher or other images)", stale.name)
        if path.exists():
            stored = load_file(str(path))
            rows, logits = stored["rows"], stored["logits"]
            logger.info("teacher logits loaded from %s", path)
        else:
            rows, logits = (torch.from_numpy(a) for a in self.teacher_predict(dataset, "caching the teacher's logits"))
            if self.is_world_process_zero():
                save_file({"rows": rows, "logits": logits}, str(path))
                logger.info("teacher logits cached in %s", path)
            self.accelerator.wait_for_everyone()
        table = torch.zeros(int(rows.max()) + 1, logits.shape[-1])
        table[rows.long()] = logits
        self.teacher_logits = table.to(self.args.device)


def teacher_cache_path(output_dir: str, teacher: torch.nn.Module, teacher_spec: ImageSpec, dataset,
                       image_column: str, precision: str = "fp32") -> Path:
    """Where the cached logits of this teacher on these images live; any change gives another file: the teacher's
    weights, its input (`teacher_spec`), the training rows (the data set's fingerprint: which rows, in which order,
    and what its table holds), the contents of the image files those rows name (`image_files_digest`) and the
    precision the teacher runs in (bf16 logits differ from fp32 ones)."""
    digest = hashlib.sha256(precision.encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(teacher_spec).encode())
    digest.update(dataset_fingerprint(dataset).encode())
    digest.update(image_files_digest(dataset, image_column).encode())
    return Path(output_dir) / f"{CACHE_PREFIX}{digest.hexdigest()[:16]}.safetensors"


def image_files_digest(dataset, image_column: str) -> str:
    """A hash of the bytes of every image file the rows name without holding its bytes, in row order ("" when every
    row holds its bytes). An image folder's rows hold only paths (`data/dataset.py`, datasets' imagefolder, the
    images of --unlabeled_dir), so a data set's fingerprint stays the same when a file is overwritten with other
    pixels. The bytes, not the files' sizes and times: a copy that keeps the times (`cp -p`, `rsync -a`, an
    archive unpacked) changes neither. Reading them costs a fraction of one epoch's decoding of the same files
    (benchmarks/cache_key.py: 19 s for 180,000 small JPEGs on 2 cores, where decoding each once took 126 s)."""
    cells = dataset.data.column(image_column)  # the whole table (any row the data set selects), not its bytes
    if not pc.any(pc.is_null(pc.struct_field(cells, "bytes"))).as_py():
        return ""
    stored = dataset.with_format(None).select_columns([image_column])
    paths = []
    for start in range(0, len(stored), 4096):
        paths += [c["path"] if c and c.get("bytes") is None else None for c in stored[start:start + 4096][image_column]]
    with ThreadPoolExecutor(max_workers=8) as pool:  # reading files: threads overlap the I/O, hashlib drops the GIL
        hashes = pool.map(_file_sha256, paths, chunksize=256)
        return hashlib.sha256("".join(hashes).encode()).hexdigest()


def _file_sha256(path: str | None) -> str:
    return "-" if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()
