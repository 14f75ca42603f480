"""The distillation objectives at their limits (tasks/objectives.py)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import distil

from hf_transfer.tasks.losses import cross_entropy
from hf_transfer.trainers.distillation_config import DistillationConfig


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))


def test_identical_logits_have_zero_kl(logits):
    student, _, labels = logits
    _, _, kd = distil(student, student.clone(), labels, alpha=0.5, temperature=3.0)
    assert kd.abs().item() < 1e-6


def test_alpha_zero_is_plain_fine_tuning_exactly(logits):
    student, teacher, labels = logits
    loss, ce, _ = distil(student, teacher, labels, alpha=0.0, temperature=4.0)
    assert torch.equal(loss, F.cross_entropy(student, labels))
    assert torch.equal(ce, F.cross_entropy(student, labels))


def test_alpha_one_ignores_labels(logits):
    student, teacher, labels = logits
    a, _, _ = distil(student, teacher, labels, alpha=1.0, temperature=2.0)
    b, _, _ = distil(student, teacher, (labels + 1) % 5, alpha=1.0, temperature=2.0)
    assert torch.equal(a, b)


def test_kl_matches_definition_with_t_squared_scaling(logits):
    student, teacher, labels = logits
    for t in (1.0, 2.0, 5.0):
        _, _, kd = distil(student, teacher, labels, alpha=0.5, temperature=t)
        p = F.softmax(teacher / t, dim=-1)
        kl = (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean()  # batchmean
        torch.testing.assert_close(kd, kl * t * t)


def test_several_labels_distil_with_each_logits_gradient_of_the_label_terms_form(logits):
    """Independent sigmoids: the distillation term scaled by T, so that each logit's gradient is
    sigmoid(student / T) - sigmoid(teacher / T) (per image), bounded by 1 as the label term's sigmoid(student) - y."""
    student, teacher, _ = logits
    labels = (torch.rand(8, 5) > 0.5).float()
    for t in (1.0, 2.0, 4.0):
        z = student.clone().requires_grad_(True)
        loss, _, _ = distil(z, teacher, labels, alpha=1.0, temperature=t, multi_label=True)
        loss.backward()
        torch.testing.assert_close(z.grad * len(z), torch.sigmoid(student / t) - torch.sigmoid(teacher / t))
    z = student.clone().requires_grad_(True)
    distil(z, teacher, labels, alpha=0.0, temperature=2.0, multi_label=True)[0].backward()
    torch.testing.assert_close(z.grad * len(z), torch.sigmoid(student) - labels)  # the label term's


def test_weighting(logits):
    student, teacher, labels = logits
    loss, ce, kd = distil(student, teacher, labels, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kd)


def test_gradients_reach_the_student_only(logits):
    student, teacher, labels = logits
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss, _, _ = distil(student, teacher, labels, alpha=0.5, temperature=2.0)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_counts_of_the_whole_step_make_accumulation_equal_one_big_batch(logits):
    student, teacher, labels = logits
    full, _, _ = distil(student, teacher, labels, alpha=0.4, temperature=2.0)
    halves = sum(distil(student[i:i + 4], teacher[i:i + 4], labels[i:i + 4], alpha=0.4, temperature=2.0,
                                   labelled_count=8, image_count=8)[0] for i in (0, 4))
    torch.testing.assert_close(halves, full)


def test_unlabeled_images_add_to_the_distillation_term_only(logits):
    student, teacher, labels = logits
    partial = labels.clone()
    partial[::2] = -1  # every other image has no label
    loss, ce, kd = distil(student, teacher, partial, alpha=0.3, temperature=2.0)
    labelled = partial >= 0
    torch.testing.assert_close(ce, F.cross_entropy(student[labelled], labels[labelled]))  # mean over the labelled
    _, _, kd_all = distil(student, teacher, labels, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(kd, kd_all)  # the KL still covers every image
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kd)
    # a soft-target row of an unlabeled image (zeros) adds nothing either, with smoothing and class weights too
    soft = F.one_hot(labels, 5).float() * labelled[:, None]
    weights = torch.rand(5) + 0.5
    torch.testing.assert_close(cross_entropy(student, soft, label_smoothing=0.1, class_weights=weights),
                               cross_entropy(student, partial, label_smoothing=0.1, class_weights=weights))
    # no labelled image at all: no label term
    assert cross_entropy(student, torch.full_like(labels, -1)).item() == 0


def test_soft_targets(logits):
    student, _, labels = logits
    one_hot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(cross_entropy(student, one_hot), F.cross_entropy(student, labels))


@pytest.mark.parametrize("alpha, temperature", [(-0.1, 1.0), (1.1, 1.0), (0.5, 0.0), (0.5, -2.0)])
def test_invalid_hyperparameters_are_refused_by_the_config(alpha, temperature):
    with pytest.raises(ValueError, match="--alpha|--temperature"):
        DistillationConfig(output_dir="x", alpha=alpha, temperature=temperature)


def test_dist_is_zero_for_the_teachers_answers_and_matches_its_definition(logits):
    """DIST (--distillation_loss dist): 1 - Pearson correlation of the softened probabilities, per image (over the
    classes) plus per class (over the batch), times T^2."""
    student, teacher, labels = logits
    _, _, same = distil(student, student.clone(), labels, alpha=0.5, temperature=2.0, loss="dist")
    assert same.abs().item() < 1e-5
    for t in (1.0, 4.0):
        _, _, kd = distil(student, teacher, labels, alpha=0.5, temperature=t, loss="dist")
        s, p = F.softmax(student / t, -1).numpy(), F.softmax(teacher / t, -1).numpy()
        inter = np.mean([1 - np.corrcoef(s[i], p[i])[0, 1] for i in range(len(s))])
        intra = np.mean([1 - np.corrcoef(s[:, c], p[:, c])[0, 1] for c in range(s.shape[1])])
        assert kd.item() == pytest.approx((inter + intra) * t * t, rel=1e-4)
    # the same ranking at another confidence is (almost) the teacher's answer; another ranking is not
    _, _, sharper = distil(teacher * 1.5, teacher, labels, alpha=1.0, temperature=1.0, loss="dist")
    _, _, other = distil(-teacher, teacher, labels, alpha=1.0, temperature=1.0, loss="dist")
    assert sharper < 0.2 < other


def test_dist_over_a_step_s_micro_batches_and_on_one_image(logits):
    student, teacher, labels = logits
    full, ce, kd = distil(student, teacher, labels, alpha=0.4, temperature=2.0, loss="dist")
    torch.testing.assert_close(full, 0.6 * ce + 0.4 * kd)
    halves = [distil(student[i:i + 4], teacher[i:i + 4], labels[i:i + 4], alpha=0.4, temperature=2.0,
                     labelled_count=8, image_count=8, loss="dist") for i in (0, 4)]
    alone = [distil(student[i:i + 4], teacher[i:i + 4], labels[i:i + 4], alpha=0.4, temperature=2.0, loss="dist")
             for i in (0, 4)]
    torch.testing.assert_close(sum(h[0] for h in halves), sum(a[0] for a in alone) / 2)  # each half weighs its share
    z = student[:1].clone().requires_grad_(True)
    loss, _, kd = distil(z, teacher[:1], labels[:1], alpha=0.5, temperature=2.0, loss="dist")
    loss.backward()
    assert torch.isfinite(kd) and torch.isfinite(z.grad).all()  # one image: no correlation over the batch


def test_the_distillation_loss_flag_lists_every_objective():
    from hf_transfer.tasks.objectives import DISTILLATION_LOSSES

    field = next(f for f in dataclasses.fields(DistillationConfig) if f.name == "distillation_loss")
    assert field.metadata["choices"] == sorted(DISTILLATION_LOSSES) == ["dist", "kl"] and field.default == "kl"
