"""The training step never makes the host wait for the device between logging steps.

On a GPU every host read of a device tensor (`.item()`, `bool(t)`, `int(t)`, `.tolist()`, `.cpu()`,
`.numpy()`, a blocking copy) stalls the CPU until the kernels queued before it have run; the next
batch cannot be prepared meanwhile and the GPU idles. On the CPU the scalar reads show up as
`aten._local_scalar_dense` calls and the copies as calls of those methods, so both are counted
here; the GPU tests check the real thing with CUDA's sync debug mode.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from hf_transfer.data.dataset import load_image_data
from hf_transfer.data.samples import attach_transforms
from hf_transfer.models.loading import load_model, load_teacher
from hf_transfer.run.assembly import trainer_kwargs
from hf_transfer.trainers.distillation_config import DistillationConfig
from hf_transfer.trainers.distillation_trainer import DistillationTrainer
from hf_transfer.trainers.nonfinite import LossWatch
from hf_transfer.trainers.transfer_config import TransferConfig
from hf_transfer.trainers.transfer_trainer import NonFiniteLossError, TransferTrainer


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value by the host, except of the tensors in `host_side`: the reads that
    reach the dispatcher (`.item()`, `bool(t)`, `int(t)`, `float(t)`: `aten._local_scalar_dense`) and those
    that do not on the CPU but copy to the host on a GPU (`.tolist()`, `.numpy()`, `.cpu()`). (`.to(device)` is
    how batches reach the device; a read through it would show up under a GPU's sync debug mode.)"""

    PYTHON_READS = ("tolist", "numpy", "cpu")

    def __init__(self, host_side):
        super().__init__()
        self.host_side, self.reads = host_side, []
        self._originals = {}

    def _record(self, tensor):
        import traceback

        stack = traceback.format_stack(limit=12)
        # The DataLoader's own sampling (a permutation drawn from a CPU generator) is host work on a GPU too.
        if tensor.data_ptr() not in self.host_side() and not any("torch/utils/data/" in frame for frame in stack):
            self.reads.append("".join(stack[-9:]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record(args[0])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in self.PYTHON_READS:
            self._originals[name] = original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self._record(tensor)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


class Window(TrainerCallback):
    """Counts host reads from the beginning of step `first` to the end of step `last` (optimizer steps)."""

    def __init__(self, first, last, host_side):
        self.first, self.last, self.mode = first, last, HostReads(host_side)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last:
            self.mode.__exit__(None, None, None)


def trainer_for(tiny_vit, cifar_like, tmp_path, device_flags, teacher=None, **overrides):
    data = load_image_data(cifar_like)
    attach_transforms(data, "basic")  # crops and flips on the device
    loaded = load_model(tiny_vit, data.label_names)
    # 4 images a batch: 12 steps an epoch, so steps 1-10 are within the first (a new epoch's DataLoader
    # draws its seed on the host, once an epoch, from a CPU generator)
    config = DistillationConfig if teacher else TransferConfig
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, dataloader_num_workers=0,
                  report_to="none", save_strategy="no", eval_strategy="no", load_best_model_at_end=False,
                  logging_steps=100, max_steps=14, mixup=0.2, disable_tqdm=True)
    args = config(**{**values, **device_flags, **overrides})
    kwargs = trainer_kwargs(args, data, loaded)
    if teacher is None:
        return data, TransferTrainer(**kwargs)
    teacher = load_teacher(teacher, data.label_names)
    return data, DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec, **kwargs)


@pytest.mark.parametrize("distil", [False, True], ids=["finetune", "distill"])
def test_training_steps_read_nothing_back_from_the_device(tiny_vit, cifar_like, cifar_teacher, tmp_path, distil):
    data, trainer = trainer_for(tiny_vit, cifar_like, tmp_path, {"use_cpu": True},
                                teacher=cifar_teacher if distil else None)

    def host_side():  # in host memory on a GPU too: the optimizer's step counters, the shared epoch counter, the
        # NaN guard's copy of its verdict (read once the copy has landed)
        steps = {state["step"].data_ptr() for state in trainer.optimizer.state.values() if "step" in state}
        watch = trainer.loss_watch._host
        return steps | {data.epoch.data_ptr()} | ({watch.data_ptr()} if watch is not None else set())

    window = Window(1, 10, host_side)
    trainer.add_callback(window)
    trainer.train()
    assert window.mode.reads == [], f"{len(window.mode.reads)} host reads in steps 2-10, the first from:\n" \
                                    f"{window.mode.reads[0] if window.mode.reads else ''}"


def test_the_loss_watch_reports_the_first_bad_step_and_its_loss():
    watch = LossWatch()
    assert watch.first_bad_step(wait=True) is None
    watch.observe(torch.tensor(1.5), step=1)
    assert watch.first_bad_step(wait=False) is None  # on the CPU the verdict is there at once
    watch.observe(torch.tensor(float("inf")), step=2, what=1)
    watch.observe(torch.tensor(float("nan")), step=3)
    assert watch.first_bad_step(wait=False) == (2, float("inf"), "gradient norm")


def test_with_max_nan_steps_each_step_reads_one_verdict(tiny_vit, cifar_like, tmp_path):
    # A step to skip must be known before the optimizer steps: the one per-step read left, and only on request.
    data, trainer = trainer_for(tiny_vit, cifar_like, tmp_path, {"use_cpu": True}, max_nan_steps=2)
    window = Window(3, 6, lambda: {data.epoch.data_ptr()} | {
        s["step"].data_ptr() for s in trainer.optimizer.state.values() if "step" in s})
    trainer.add_callback(window)
    trainer.train()
    assert len(window.mode.reads) == 3  # steps 4, 5 and 6: one each, from StepSkipper.on_pre_optimizer_step


gpu = pytest.mark.gpu


@gpu
def test_on_a_gpu_training_steps_do_not_synchronise(tiny_vit, cifar_like, tmp_path):
    data, trainer = trainer_for(tiny_vit, cifar_like, tmp_path, {"dataloader_pin_memory": True})

    class SyncDebug(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                torch.cuda.set_sync_debug_mode("error")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 12:
                torch.cuda.set_sync_debug_mode("default")

    trainer.add_callback(SyncDebug())
    try:
        trainer.train()  # a synchronising call between steps 3 and 12 raises
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.args.accelerator_config.non_blocking


@pytest.mark.parametrize("device_flags", [{"use_cpu": True}, pytest.param({}, marks=gpu)], ids=["cpu", "gpu"])
def test_a_nan_loss_on_a_save_step_stops_the_run_before_that_checkpoint(tiny_vit, cifar_like, tmp_path, device_flags):
    # On a GPU the verdict is read without a sync, so it may arrive after the step: it is awaited before the save.
    data, trainer = trainer_for(tiny_vit, cifar_like, tmp_path, device_flags, save_strategy="steps", save_steps=4)
    calls = {"n": 0}

    def nan_at_eight(module, args, kwargs):  # the step that is also saved
        if module.training:
            calls["n"] += 1
            if calls["n"] == 8:
                kwargs = {**kwargs, "pixel_values": kwargs["pixel_values"] * float("nan")}
        return args, kwargs

    trainer.model.register_forward_pre_hook(nan_at_eight, with_kwargs=True)
    with pytest.raises(NonFiniteLossError, match="at step 8 of 14; stopped (before applying it|after step 8,)"):
        trainer.train()
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "checkpoint-8").exists()
