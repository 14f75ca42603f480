"""Freezing, progressive unfreezing, per-layer learning rates, step decay, mixup/CutMix."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_flags
from datasets import ClassLabel, DatasetDict
from helpers import make_checkpoint
from transformers import AutoModelForImageClassification

import run_distill
import run_finetune
from hf_transfer.data.sources import digits_dataset
from hf_transfer.errors import UserError
from hf_transfer.models.loading import load_model
from hf_transfer.models.structure import depth_groups
from hf_transfer.on_device.mixing import BatchMix
from hf_transfer.tasks.classification import SingleLabel
from hf_transfer.trainers.freezing import apply_stage, parse_schedule, trainable_names
from hf_transfer.trainers.optimizer import param_groups, step_schedule

NAMES = ["red", "green", "blue"]


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForImageClassification.from_pretrained(path).state_dict()


def same(a, b, names) -> bool:
    return all(torch.equal(a[n], b[n]) for n in names)


@pytest.mark.parametrize("fixture", ["tiny_resnet", "tiny_vit", "tiny_hf_resnet"])
def test_progressive_unfreezing_trains_each_stage_from_its_epoch(request, fixture, cifar_like, tmp_path):
    source = request.getfixturevalue(fixture)
    model = load_model(source, NAMES).model
    groups = depth_groups(model)
    head = set(groups[-1])
    last = trainable_names(model, "last_stage") - head
    stem = set(groups[0])
    assert last and stem and not (last & stem)
    buffers = [n for n, _ in model.named_buffers() if "running_mean" in n and any(n.startswith(s.rsplit(".", 1)[0])
                                                                                  for s in stem)]
    original = weights(source)

    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", source, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--unfreeze_schedule", "0:head,1:last_stage,2:all", "--num_train_epochs", "3",
                       "--learning_rate", "0.05", "--save_total_limit", "10", *quick_flags()])
    after_0, after_1, after_2 = (weights(p) for p in checkpoints(out))

    assert same(after_0, original, last | stem)  # epoch 0: head only
    assert not same(after_1, after_0, head)
    assert same(after_1, original, stem) and not same(after_1, original, last)  # epoch 1: + last stage
    assert not same(after_2, original, stem)  # epoch 2: everything
    if buffers:  # frozen BatchNorm keeps its running statistics while its stage is frozen
        assert same(after_1, original, buffers) and not same(after_2, original, buffers)

    stages = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "stage" in h]
    assert [h["stage"] for h in stages] == ["head", "last_stage", "all"]
    counts = [h["trainable_parameters"] for h in stages]
    assert counts[0] < counts[1] < counts[2] == sum(p.numel() for p in model.parameters())


def test_freeze_backbone_trains_only_the_head(tiny_hf_resnet, cifar_like, tmp_path):
    out = tmp_path / "probe"
    run_finetune.main(["--model_name_or_path", tiny_hf_resnet, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--freeze_backbone", "--num_train_epochs", "1", "--learning_rate", "0.05", *quick_flags()])
    model = load_model(tiny_hf_resnet, NAMES).model
    backbone = {n for n, _ in model.named_parameters()} - set(depth_groups(model)[-1])
    buffers = [n for n, _ in model.named_buffers() if "running" in n]
    assert same(weights(out), weights(tiny_hf_resnet), backbone | set(buffers))


@pytest.mark.slow
def test_linear_probe_transfers_between_halves_of_digits(tmp_path):
    """A backbone trained on digits 0-4, frozen, with a new head for digits 5-9: real transfer."""
    digits = digits_dataset()
    for low in (0, 5):
        halves = {}
        for split, ds in digits.items():
            part = ds.filter(lambda b, low=low: [low <= x < low + 5 for x in b["label"]], batched=True)
            part = part.map(lambda b, low=low: {"label": [x - low for x in b["label"]]}, batched=True)
            halves[split] = part.cast_column("label", ClassLabel(names=[str(i) for i in range(low, low + 5)]))
        DatasetDict(halves).save_to_disk(str(tmp_path / f"digits-{low}"))
    flags = ["--num_train_epochs", "5", "--learning_rate", "0.05", "--per_device_train_batch_size", "32",
             "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0"]
    architecture = make_checkpoint("resnet", tmp_path / "arch")
    run_finetune.main(["--model_name_or_path", architecture, "--from_scratch", "--dataset_name",
                       str(tmp_path / "digits-0"), "--output_dir", str(tmp_path / "first-half"), *flags])
    results = run_finetune.main(["--model_name_or_path", str(tmp_path / "first-half"), "--freeze_backbone",
                                 "--dataset_name", str(tmp_path / "digits-5"), "--output_dir",
                                 str(tmp_path / "probe"), *flags])
    assert results["test_accuracy"] >= 0.6  # 5 classes: chance is 0.2


@pytest.mark.parametrize("text, message", [
    ("0:head,2:last_layer", "unknown stage 'last_layer'; valid stages are: head, last_stage, all"),
    ("1:head", "must start at epoch 0"),
    ("0:head,0:all", "increasing epochs"),
    ("head", "is not EPOCH:STAGE"),
])
def test_bad_schedules(text, message):
    with pytest.raises(UserError, match=message):
        parse_schedule(text)


def test_bad_schedule_fails_before_loading_anything(tmp_path):
    with pytest.raises(UserError, match="unknown stage 'middle'"):
        run_finetune.main(["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o"),
                           "--unfreeze_schedule", "0:head,1:middle"])


def test_stages_of_a_timm_vit_and_a_timm_resnet():
    from transformers import TimmWrapperConfig

    vit = AutoModelForImageClassification.from_config(TimmWrapperConfig(architecture="vit_tiny_patch16_224",
                                                                        num_labels=3))
    last = trainable_names(vit, "last_stage")
    assert {n.split(".")[2] for n in last if n.startswith("timm_model.blocks.")} == {"9", "10", "11"}
    assert "timm_model.norm.weight" in last and "timm_model.head.weight" in last
    resnet = AutoModelForImageClassification.from_config(TimmWrapperConfig(architecture="resnet18", num_labels=3))
    assert {n.split(".")[1] for n in trainable_names(resnet, "last_stage")} == {"layer4", "fc"}
    assert apply_stage(resnet, "head") == 512 * 3 + 3


def test_parameter_groups_learning_rates_and_weight_decay(tiny_vit):
    model = load_model(tiny_vit, NAMES).model
    groups = param_groups(model, learning_rate=0.1, weight_decay=0.05, backbone_lr_scale=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == len(list(model.parameters()))  # every parameter, frozen or not
    for name, param in model.named_parameters():
        group = by_param[id(param)]
        assert group["lr"] == pytest.approx(0.1 if name.startswith("classifier") else 0.01), name
        if param.ndim == 1 or "position_embeddings" in name or "cls_token" in name:
            assert group["weight_decay"] == 0.0, name
        else:
            assert group["weight_decay"] == 0.05, name
    assert groups[0]["name"] == "head"


def test_layer_decay(tiny_vit):
    model = load_model(tiny_vit, NAMES).model
    depths = depth_groups(model)  # stem, block 0, block 1 (+ final norm), head
    groups = param_groups(model, learning_rate=1.0, weight_decay=0.0, layer_decay=0.5)
    lr = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert lr[depths[-1][0]] == 1.0
    assert lr[depths[2][0]] == 0.5 and lr[depths[1][0]] == 0.25 and lr[depths[0][0]] == 0.125


def test_step_schedule_changes_the_rate_at_the_right_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    schedule = step_schedule(optimizer, steps_per_epoch=4, step_size_epochs=2, gamma=0.1)
    rates = []
    for _ in range(17):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:8] == [0.2] * 8
    assert rates[8:16] == pytest.approx([0.02] * 8) and rates[16] == pytest.approx(0.002)


def test_step_schedule_and_group_rates_are_logged(tiny_vit, cifar_like, tmp_path):
    out = tmp_path / "run"
    run_finetune.main(["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--num_train_epochs", "2", "--learning_rate", "0.01", "--lr_step_size", "1",
                       "--lr_step_gamma", "0.5", "--warmup_steps", "0", "--backbone_lr_scale", "0.1", *quick_flags(),
                       "--logging_steps", "1"])
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "learning_rate" in h]
    steps_per_epoch = 6  # 43 training images, batch 8
    # logged after each optimizer step: the rate used for step `step`
    for h in logs:
        expected = 0.01 * 0.5 ** ((h["step"] - 1) // steps_per_epoch)
        assert h["learning_rate"] == h["learning_rate/head"] == pytest.approx(expected)
        assert h["learning_rate/backbone"] == pytest.approx(expected * 0.1)


def constant_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value 2i and has label i, so every mixture can be read back."""
    values = torch.arange(n) * 2
    return values.view(n, 1, 1, 1).expand(n, 3, 16, 16).to(torch.uint8).contiguous(), torch.arange(n)


def test_mixup_draws_a_lambda_per_sample():
    torch.manual_seed(0)
    images, labels = constant_images(64)
    mixed, targets, _ = BatchMix(SingleLabel(64).targets, mixup_alpha=0.4)(images, labels)
    assert mixed.shape == images.shape and mixed.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(64))
    partner = targets.clone()
    partner[labels, labels] = 0
    moved = partner.sum(1) > 0  # samples whose partner is another image
    own = targets[labels, labels]
    # each pixel is exactly the blend its target describes
    expected = own * images[:, 0, 0, 0].float() + (partner * images[:, 0, 0, 0].float()).sum(1)
    assert torch.allclose(mixed[:, 0, 0, 0], expected, atol=1e-3)
    assert own[moved].unique().numel() > 32  # one lambda per sample, not one per batch


def test_cutmix_pastes_a_box_per_sample_and_labels_follow_its_area():
    torch.manual_seed(0)
    images, labels = constant_images(64)
    mixed, targets, _ = BatchMix(SingleLabel(64).targets, cutmix_alpha=1.0)(images, labels)
    own_value = images[:, :1].float()
    pasted = (mixed[:, :1] != own_value).flatten(1).float().mean(1)  # share of each image replaced
    own = targets[labels, labels]
    moved = own < 1
    assert torch.allclose(own[moved], 1 - pasted[moved])
    assert pasted.unique().numel() > 16  # boxes differ between samples


@pytest.mark.parametrize("flags", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}])
def test_every_view_of_a_batch_is_mixed_with_the_same_draws(flags):
    """A teacher's own view (here a copy at the same size, and one at twice the size) gets the student's partners,
    weights and boxes: the copy comes out identical, the large view is the student's mixture up to box rounding."""
    torch.manual_seed(0)
    images, labels = constant_images(32)
    large = torch.nn.functional.interpolate(images.float(), scale_factor=2, mode="nearest").to(torch.uint8)
    mixed, targets, views = BatchMix(SingleLabel(32).targets, **flags)(images, labels, {"copy": images.clone(), "large": large})
    assert torch.equal(views["copy"], mixed)
    shrunk = torch.nn.functional.avg_pool2d(views["large"], 2)
    assert (shrunk - mixed).abs().gt(0.5).float().mean() < 0.1  # box edges may round to the next pixel
    unlabeled = labels.clone()
    unlabeled[::2] = -1  # images without a label: their share of a mixture carries no target
    torch.manual_seed(0)
    _, partial, _ = BatchMix(SingleLabel(32).targets, **flags)(images, unlabeled)
    own = torch.stack([partial[i, labels[i]] for i in range(32)])
    assert torch.all(own[::2] == 0) and torch.allclose(own[1::2], targets[1::2].gather(1, labels[1::2, None])[:, 0])


def test_mixup_and_cutmix_train_in_both_scripts(cifar_teacher, tiny_resnet, cifar_like, tmp_path, monkeypatch):
    """Both scripts train on the mixed soft targets, with label smoothing, every step."""
    import inspect

    from hf_transfer.tasks import classification as tasks

    seen = []
    original = tasks.cross_entropy

    def recorded(*args, **kwargs):  # the label term of both objectives (tasks.SingleLabel.loss)
        bound = inspect.signature(original).bind(*args, **kwargs)
        training = bound.arguments["logits"].requires_grad  # evaluation has no graph
        seen.append((tuple(bound.arguments["targets"].shape), bound.arguments.get("label_smoothing"), training))
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks, "cross_entropy", recorded)
    flags = ["--dataset_name", cifar_like, "--num_train_epochs", "1", "--mixup", "0.2", "--cutmix", "1.0",
             "--augmentation", "strong", "--label_smoothing_factor", "0.1", *quick_flags()]
    tuned = run_finetune.main(["--model_name_or_path", tiny_resnet, "--output_dir", str(tmp_path / "f"), *flags])
    steps = {"finetune": [s for s in seen if s[2]]}
    seen.clear()
    distilled = run_distill.main(["--teacher_model_name_or_path", cifar_teacher, "--student_model_name_or_path",
                                  tiny_resnet, "--output_dir", str(tmp_path / "d"), *flags])
    steps["distill"] = [s for s in seen if s[2]]
    # both also score evaluations (class indices, no graph); every training step gets the mixed soft targets
    for name, results in (("finetune", tuned), ("distill", distilled)):
        assert len(steps[name]) >= 4, name  # one per training step (4-5 steps of 8 images)
        assert all(len(shape) == 2 and shape[1] == 3 and smoothing == 0.1 for shape, smoothing, _ in steps[name]), \
            name
        assert np.isfinite(results["train_loss"])


@pytest.mark.parametrize("flags, message", [
    (["--layer_decay", "1.5"], r"--layer_decay must be in \(0, 1\]"),
    (["--backbone_lr_scale", "-1"], "--backbone_lr_scale must be >= 0"),
    (["--lr_step_size", "0"], "--lr_step_size must be > 0"),
    (["--mixup", "-0.1"], "--mixup and --cutmix must be >= 0"),
    (["--freeze_backbone", "--unfreeze_schedule", "0:head"], "either --freeze_backbone or --unfreeze_schedule"),
])
def test_bad_strategy_flags(flags, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run_finetune.main(["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o"), *flags])
