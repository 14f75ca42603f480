"""Which checkpoint a run keeps (trainers/selection.py): a tie on the selection metric is broken instead of keeping
the first checkpoint that reached it, early stopping counts ties the same way, and the run says what it kept and
warns when its validation images were too few to choose."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import quick_flags
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState
from transformers.trainer_utils import SaveStrategy

import run_distill
import run_finetune
from hf_transfer.data.dataset import load_image_data
from hf_transfer.data.samples import attach_transforms
from hf_transfer.errors import UserError
from hf_transfer.models.loading import load_model, load_teacher
from hf_transfer.run.assembly import trainer_kwargs
from hf_transfer.trainers.distillation_config import DistillationConfig
from hf_transfer.trainers.distillation_trainer import DistillationTrainer
from hf_transfer.trainers.selection import EarlyStopping, describe_choice, take_tie, wins_tie


class Args:
    """The fields of the run's arguments the choice reads."""

    def __init__(self, metric="accuracy", tie_break="loss", greater_is_better=True, load_best=True, min_images=0):
        self.metric_for_best_model, self.best_model_tie_break = metric, tie_break
        self.greater_is_better, self.load_best_model_at_end = greater_is_better, load_best
        self.best_model_min_images, self.save_strategy = min_images, SaveStrategy.EPOCH


def state_after(evaluations: list[dict], best_step: int, best_metric: float) -> TrainerState:
    """A Trainer state whose log history holds these evaluations (each with its step)."""
    state = TrainerState()
    state.log_history = [dict(e) for e in evaluations]
    state.best_global_step, state.best_metric = best_step, best_metric
    state.best_model_checkpoint = f"checkpoint-{best_step}"
    state.global_step = evaluations[-1]["step"] if evaluations else 0
    state.epoch = float(len(evaluations))
    return state


# ---------------------------------------------------------------- a real run whose small validation split saturates


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def saturated_run(tiny_resnet, cifar_like, tmp_path_factory):
    """An easy task (a colour per class) with 5 validation images (a tenth of 48): validation accuracy reaches 1.0
    within the first evaluations and stays there while the weights keep changing."""
    out = tmp_path_factory.mktemp("saturated")
    records = Records()
    logging.getLogger("hf_transfer").addHandler(records)
    try:
        results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", cifar_like,
                                     "--output_dir", str(out), "--num_train_epochs", "4", "--save_total_limit", "5",
                                     *quick_flags()])
    finally:
        logging.getLogger("hf_transfer").removeHandler(records)
    state = json.loads((out / "trainer_state.json").read_text())
    evaluations = [e for e in state["log_history"] if "eval_accuracy" in e]
    return out, results, state, evaluations, records.lines


@pytest.mark.slow
def test_a_saturated_metric_keeps_the_latest_tied_checkpoint_not_the_first(saturated_run):
    out, results, state, evaluations, _ = saturated_run
    tied = [e for e in evaluations if e["eval_accuracy"] == 1.0]
    assert results["eval_samples"] == 5
    assert len(tied) >= 2, "the run must reach validation accuracy 1.0 at two evaluations or more"
    assert state["best_global_step"] == tied[-1]["step"]
    # the run's model is the kept checkpoint (the Trainer loaded it at the end), not the first at 1.0
    saved, kept = load_file(out / "model.safetensors"), load_file(out / f"checkpoint-{tied[-1]['step']}" /
                                                                   "model.safetensors")
    first = load_file(out / f"checkpoint-{tied[0]['step']}" / "model.safetensors")
    assert all(torch.equal(saved[k], kept[k]) for k in kept)
    assert not all(torch.equal(saved[k], first[k]) for k in first)


@pytest.mark.slow
def test_the_results_and_the_card_say_which_step_was_kept_and_why(saturated_run):
    out, results, state, evaluations, _ = saturated_run
    step = state["best_global_step"]
    tied = sum(e["eval_accuracy"] == 1.0 for e in evaluations)
    train = json.loads((out / "train_results.json").read_text())
    assert results["selected_step"] == train["selected_step"] == step
    assert train["train_steps"] == state["global_step"]
    assert f"reached at {tied} of {len(evaluations)} evaluations; the latest of them" in train["selected_by"]
    card = (out / "README.md").read_text()
    which = "the last" if step == state["global_step"] else f"of {state['global_step']}"
    assert f"Kept weights: step {step} ({which}, epoch " in card
    assert "the best validation accuracy (1.0000 on 5 validation images)" in card


@pytest.mark.slow
def test_a_validation_split_too_small_to_choose_gets_one_warning(saturated_run):
    *_, state, evaluations, warnings = saturated_run
    tied = [e["step"] for e in evaluations if e["eval_accuracy"] == 1.0]
    lines = [w for w in warnings if "could not choose" in w]
    assert lines == [f"5 validation images could not choose: validation accuracy was 1 at {len(tied)} of "
                     f"{len(evaluations)} evaluations (from step {tied[0]}); kept step {state['best_global_step']} "
                     "by the tie-break; hold out more images for validation (--validation_split, --validation_dir), or keep the "
                     "last weights below N of them (--best_model_min_images N)"]


# ---------------------------------------------------------------- the rule itself


EVALS = [{"step": 10, "epoch": 1.0, "eval_accuracy": 0.9, "eval_loss": 0.8},
         {"step": 20, "epoch": 2.0, "eval_accuracy": 1.0, "eval_loss": 0.5}]


@pytest.mark.parametrize("tie_break, new_loss, wins", [("loss", 0.4, True), ("loss", 0.5, False), ("loss", 0.6, False),
                                                       ("last", 0.6, True)])
def test_a_tie_goes_to_the_lower_loss_or_to_the_later_checkpoint(tie_break, new_loss, wins):
    state = state_after([*EVALS, {"step": 30, "eval_accuracy": 1.0, "eval_loss": new_loss}], 20, 1.0)
    assert take_tie({"eval_accuracy": 1.0, "eval_loss": new_loss}, state, Args(tie_break=tie_break)) is wins
    assert state.best_global_step == (30 if wins else 20)
    # a value that is not a tie is the Trainer's to judge (strictly better wins there; worse never)
    assert not take_tie({"eval_accuracy": 0.9, "eval_loss": 0.01}, state, Args(tie_break=tie_break))


def test_the_tie_break_reads_the_best_from_the_log_history_so_a_resumed_run_breaks_ties_alike():
    """A resumed run has only its saved state: the best's loss comes from the log history, and with EMA from the
    averaged weights' entry (eval_loss), never the raw weights' (eval_raw_loss) logged at the same step."""
    history = [*EVALS, {"step": 20, "eval_raw_loss": 0.1, "eval_raw_accuracy": 1.0}]
    state = state_after(history, 20, 1.0)
    assert wins_tie({"eval_accuracy": 1.0, "eval_loss": 0.3, "eval_raw_loss": 0.9}, state, Args())
    assert not wins_tie({"eval_accuracy": 1.0, "eval_loss": 0.6}, state, Args())


def test_early_stopping_counts_a_tie_won_by_a_lower_loss_as_an_improvement():
    """--early_stopping_patience 1: the Trainer's callback stopped at the first tie, so with --best_model_tie_break loss
    a saturated metric stopped the run one evaluation after it saturated however much the loss still fell; a lost
    tie still counts."""
    stopper, control = EarlyStopping(early_stopping_patience=1), TrainerControl()
    state = state_after(EVALS, 20, 1.0)
    stopper.on_evaluate(Args(tie_break="loss"), state, control, {"eval_accuracy": 1.0, "eval_loss": 0.4})
    assert not control.should_training_stop and stopper.early_stopping_patience_counter == 0
    stopper.on_evaluate(Args(tie_break="loss"), state, control, {"eval_accuracy": 1.0, "eval_loss": 0.7})
    assert control.should_training_stop and stopper.early_stopping_patience_counter == 1


def test_a_plateau_stops_early_and_keeps_its_latest_weights():
    """The default tie-break takes the later checkpoint, which is no improvement: a flat metric still stops the run,
    and the checkpoint kept is the plateau's last (the Trainer kept its first)."""
    stopper, control, args = EarlyStopping(early_stopping_patience=1), TrainerControl(), Args(tie_break="last")
    state = state_after([*EVALS, {"step": 30, "eval_accuracy": 1.0, "eval_loss": 0.6}], 20, 1.0)
    stopper.on_evaluate(args, state, control, {"eval_accuracy": 1.0, "eval_loss": 0.6})
    assert control.should_training_stop
    assert take_tie({"eval_accuracy": 1.0, "eval_loss": 0.6}, state, args) and state.best_global_step == 30


def test_a_kept_checkpoint_one_image_ahead_of_the_last_gets_a_warning():
    evaluations = [{"step": 10, "epoch": 1.0, "eval_accuracy": 0.8, "eval_loss": 0.8},
                   {"step": 20, "epoch": 2.0, "eval_accuracy": 0.9, "eval_loss": 0.5},
                   {"step": 30, "epoch": 3.0, "eval_accuracy": 0.85, "eval_loss": 0.4}]
    choice = describe_choice(Args(), state_after(evaluations, 20, 0.9), images=20)
    assert (choice.step, choice.last_step, choice.epoch) == (20, 30, 2.0)
    assert choice.warning.startswith("20 validation images could not choose: the kept step 20 is ahead of the last "
                                     "(step 30) by 1 image(s)")
    assert describe_choice(Args(), state_after(evaluations, 20, 0.9), images=40).warning is None  # 2 images ahead
    # level with the last (a tie the loss broke, below the ceiling): nothing to warn about
    level = [*evaluations[:2], {**evaluations[2], "eval_accuracy": 0.9}]
    assert describe_choice(Args(), state_after(level, 20, 0.9), images=20).warning is None


def test_without_a_choice_the_run_says_it_kept_its_last_weights():
    choice = describe_choice(Args(load_best=False), state_after(EVALS, 20, 1.0), images=5)
    assert (choice.step, choice.warning) == (20, None)
    assert choice.reason == "the last weights (--load_best_model_at_end is off)"


def test_an_unknown_tie_break_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="--best_model_tie_break must be one of loss, last, got 'first'"):
        run_finetune.main(["--dataset_name", "digits", "--best_model_tie_break", "first", "--output_dir",
                           str(tmp_path)])


# ---------------------------------------------------------------- the distillation judge


def distillation_trainer(teacher_dir, student_dir, data_path, output_dir, temperature):
    data = load_image_data(data_path, seed=0)
    teacher = load_teacher(teacher_dir, data.label_names)
    student = load_model(student_dir, data.label_names)
    attach_transforms(data, "none")
    args = DistillationConfig(output_dir=str(output_dir), dataloader_num_workers=0, report_to="none", use_cpu=True,
                              max_steps=1, temperature=temperature)
    return DistillationTrainer(teacher=teacher.model, teacher_spec=teacher.spec,
                               **trainer_kwargs(args, data, student)), data


@pytest.mark.slow
def test_a_distillation_evaluation_scores_the_student_against_the_teacher_on_the_validation_images(
        cifar_teacher, tiny_resnet, cifar_like, tmp_path):
    """eval_kd_loss: the training's distillation term (T^2 KL(teacher_T || student_T), mean over the images) on the
    validation images, labels unused; zero for a student that is the teacher."""
    same, _ = distillation_trainer(cifar_teacher, cifar_teacher, cifar_like, tmp_path / "same", 2.0)
    assert same.evaluate()["eval_kd_loss"] == pytest.approx(0.0, abs=1e-5)

    trainer, data = distillation_trainer(cifar_teacher, tiny_resnet, cifar_like, tmp_path / "other", 3.0)
    metrics = trainer.evaluate()
    student = torch.as_tensor(trainer.predict(data.validation).predictions) / 3.0
    teacher = torch.as_tensor(trainer.teacher_predict(data.validation)[1]) / 3.0
    kl = (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1).mean() * 9.0
    assert metrics["eval_kd_loss"] == pytest.approx(kl.item(), rel=1e-4) and kl > 0.01


def distill(teacher, student, data, out, *flags) -> tuple[dict, dict, list[str]]:
    records = Records()
    logging.getLogger("hf_transfer").addHandler(records)
    try:
        results = run_distill.main(["--teacher_model_name_or_path", teacher, "--student_model_name_or_path", student,
                                    "--dataset_name", data, "--output_dir", str(out), "--num_train_epochs", "3",
                                    "--save_total_limit", "5", *quick_flags(), *flags])
    finally:
        logging.getLogger("hf_transfer").removeHandler(records)
    return results, json.loads((out / "trainer_state.json").read_text()), records.lines


@pytest.mark.slow
def test_a_student_with_too_few_validation_images_keeps_its_last_weights(cifar_teacher, tiny_resnet, cifar_like,
                                                                          tmp_path):
    """run_distill's --best_model_min_images 144 (measured): 5 validation images choose nothing; the student is the
    last weights, the results and the card say why, one warning says so, and early stopping is refused."""
    results, state, warnings = distill(cifar_teacher, tiny_resnet, cifar_like, tmp_path / "o")
    assert results["selected_step"] == results["train_steps"] == state["global_step"]
    saved = load_file(tmp_path / "o" / "model.safetensors")
    last = load_file(tmp_path / "o" / f"checkpoint-{state['global_step']}" / "model.safetensors")
    assert all(torch.equal(saved[k], last[k]) for k in last)
    reason = "the last weights (5 validation images are fewer than --best_model_min_images 144, too few to choose)"
    assert results["selected_by"] == reason and reason in (tmp_path / "o" / "README.md").read_text()
    assert [w for w in warnings if "too few" in w] == [
        "5 validation images are too few to choose a checkpoint (--best_model_min_images 144): the run kept its last "
        "weights"]
    with pytest.raises(UserError, match="--early_stopping_patience needs a checkpoint choice, and 5 validation "
                                        "images are fewer than --best_model_min_images 144"):
        distill(cifar_teacher, tiny_resnet, cifar_like, tmp_path / "stop", "--early_stopping_patience", "1")


@pytest.mark.slow
def test_a_student_that_chooses_is_chosen_by_the_distillation_loss_on_validation(cifar_teacher, tiny_resnet,
                                                                                cifar_like, tmp_path):
    results, state, _ = distill(cifar_teacher, tiny_resnet, cifar_like, tmp_path / "o", "--best_model_min_images", "0")
    evaluations = [e for e in state["log_history"] if "eval_kd_loss" in e]
    lowest = min(e["eval_kd_loss"] for e in evaluations)
    kept = [e for e in evaluations if e["eval_kd_loss"] == lowest][-1]
    assert state["best_global_step"] == results["selected_step"] == kept["step"]
    assert state["best_metric"] == lowest
    assert results["selected_by"].startswith(f"the lowest validation distillation loss ({lowest:.4f} on 5 "
                                             "validation images)")


# ---------------------------------------------------------------- the benchmark's rules


def test_the_benchmark_computes_each_rule_as_the_docs_describe_it():
    """benchmarks/selection.py: 4 evaluations of 2 validation images; accuracy 0.5, 1, 1, 0.5 (a tie at 1.0)."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import selection as bench

    tables = {"right": np.array([[0, 1], [1, 1], [1, 1], [1, 0]], dtype=float),
              "ce": np.array([[2.0, 0.2], [0.4, 0.6], [0.5, 0.6], [0.1, 3.0]]),
              "agree": np.array([[1, 1], [1, 1], [0, 1], [1, 1]], dtype=float),
              "kd": np.array([[0.3, 0.3], [0.2, 0.2], [0.4, 0.4], [0.2, 0.2]])}
    kept = bench.choices(tables, np.arange(2), np.arange(2))
    assert kept == {"first": 1, "acc>loss": 1, "acc>last": 2, "loss": 1, "last": 3, "margin": 3,
                    "agree>kd(S)": 3, "kd(S)": 3, "agree>kd(J)": 3, "kd(J)": 3}
