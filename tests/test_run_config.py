"""One run, one resolved configuration (config/run_config.py): parsed once, frozen, recorded whole in run_args.json."""

import dataclasses
import json

import pytest
from transformers import TrainerCallback

import run_finetune
from hf_transfer.config.fitting import fit_to_data
from hf_transfer.config.run_config import parse_arguments
from hf_transfer.trainers.transfer_config import FrozenConfigError


def test_parsing_resolves_what_the_flags_name_once_and_freezes_it(tiny_resnet, tmp_path):
    config = parse_arguments(["--model_name_or_path", tiny_resnet, "--dataset_name", "digits",
                              "--output_dir", str(tmp_path)])
    assert (config.source, config.preset, config.family, config.command) == (tiny_resnet, None, "cnn", "finetune")
    assert config.data.augmentation != "auto" and config.recipe["optim"] == config.training.optim
    with pytest.raises(FrozenConfigError, match="learning_rate"):
        config.training.learning_rate = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.max_train_samples = 10
    config.training.learning_rate = config.training.learning_rate  # setting a field to its own value is no change

    preset = parse_arguments(["--model", "vit-tiny", "--output_dir", str(tmp_path)])
    assert (preset.preset, preset.family) == ("vit-tiny", "vit") and preset.source.startswith("timm/")


def test_the_data_fitted_values_make_a_new_configuration(tiny_resnet, tmp_path):
    config = parse_arguments(["--model_name_or_path", tiny_resnet, "--output_dir", str(tmp_path)])
    fits = fit_to_data(config.training, 100, config.given)
    fitted = config.fitted_to({fit.flag: fit.value for fit in fits})
    assert {fit.flag for fit in fits} == {"per_device_train_batch_size", "num_train_epochs"}
    assert fitted.training.per_device_train_batch_size == 10 and config.training.per_device_train_batch_size == 128
    assert fitted.training.num_train_epochs > config.training.num_train_epochs == 3
    # Built again from the flags as parsed: what the Trainer derives from them follows (the logging and saving
    # schedule, the metric's direction) instead of keeping the parse's.
    judged = config.fitted_to({"metric_for_best_model": "kd_loss"})
    assert (judged.training.greater_is_better, config.training.greater_is_better) == (False, True)


@pytest.mark.slow
def test_a_run_records_its_resolved_configuration_and_never_changes_it(tiny_resnet, tmp_path):
    """The Trainer's arguments are the frozen, fitted configuration from the first step to the saved model."""

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.frozen, self.begin = args.__dict__.get("_frozen"), args.to_dict()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = args.to_dict()

    out, watch = tmp_path / "run", Watch()
    run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", "digits", "--max_train_samples", "60",
                       "--max_steps", "2", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true"],
                      callbacks=[watch])
    assert watch.frozen and watch.begin == watch.end and watch.begin["per_device_train_batch_size"] == 8
    saved = json.loads((out / "run_args.json").read_text())
    resolved = saved["resolved"]
    assert (resolved["source"], resolved["family"], resolved["preset"]) == (tiny_resnet, "cnn", None)
    assert resolved["fitted"]["per_device_train_batch_size"] == 8  # a tenth of 60 images, at least 8
    assert resolved["data"]["dataset_name"] == "digits" and resolved["data"]["augmentation"] != "auto"
    assert saved["shaping"]["global_batch_size"] == 8


def test_a_batch_fitted_to_very_few_images_says_it_is_the_smallest_one(tiny_resnet, tmp_path):
    config = parse_arguments(["--model_name_or_path", tiny_resnet, "--output_dir", str(tmp_path)])
    batch = next(fit for fit in fit_to_data(config.training, 5, config.given) if fit.flag == "per_device_train_batch_size")
    assert batch.value == 8 and str(batch).endswith("(a tenth of the 5 training images, at least 8)")
    batch = next(fit for fit in fit_to_data(config.training, 100, config.given) if fit.flag == "per_device_train_batch_size")
    assert batch.value == 10 and str(batch).endswith("(a tenth of the 100 training images)")
