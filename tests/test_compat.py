"""Canaries for `hf_transfer/integrations/compat.py`: each asserts the library behaviour a workaround exists for.

When one fails, the library changed: the workaround named in the test may be obsolete (delete it)
or broken (fix it). The tests that the workarounds work live beside the features that need them.
"""

import dataclasses
import inspect
import json
import logging

import pytest
import torch
from helpers import make_checkpoint
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTImageProcessor,
)

from hf_transfer.integrations import compat


def test_trainer_checkpoint_loading_still_skips_renamed_vit_layers(tiny_vit, tmp_path):
    """transformers#43701/#48805 -> compat.load_checkpoint_weights, TransferTrainer._load_from_checkpoint/_load_best_model."""
    saved = AutoModelForImageClassification.from_pretrained(tiny_vit)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(1.0)
    saved.save_pretrained(tmp_path / "checkpoint-1")
    fresh = AutoModelForImageClassification.from_pretrained(tiny_vit)
    trainer = Trainer(model=fresh, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    Trainer._load_from_checkpoint(trainer, str(tmp_path / "checkpoint-1"))
    expected = saved.state_dict()
    skipped = [k for k, v in fresh.state_dict().items() if not torch.equal(v, expected[k])]
    assert skipped, "the Trainer now loads every layer: compat.load_checkpoint_weights can go"

    compat.load_checkpoint_weights(fresh, str(tmp_path / "checkpoint-1"))
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())


def test_trainer_still_prepares_every_batch_through_prepare_inputs(tiny_vit, tmp_path):
    """TransferTrainer._prepare_inputs is where uint8 batches become model input, in training and evaluation."""
    calls = []

    class Recording(Trainer):
        def _prepare_inputs(self, inputs):
            calls.append("train" if self.model.training else "eval")
            return super()._prepare_inputs(inputs)

    model = AutoModelForImageClassification.from_pretrained(tiny_vit)
    batch = [{"pixel_values": torch.zeros(3, 32, 32), "labels": 0}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1,
                             per_device_train_batch_size=4, save_strategy="no")
    trainer = Recording(model=model, args=args, train_dataset=batch, eval_dataset=batch)
    trainer.train()
    trainer.evaluate()
    assert "train" in calls and "eval" in calls


def test_timm_local_config_with_pretrained_cfg_still_overrides_the_saved_processor(tiny_resnet, tmp_path):
    """-> compat.drop_timm_pretrained_cfg: a saved run must use the processor it was evaluated with."""
    folder = tmp_path / "run"
    AutoModelForImageClassification.from_pretrained(tiny_resnet).save_pretrained(folder)
    assert "pretrained_cfg" in json.loads((folder / "config.json").read_text())
    ViTImageProcessor(size={"height": 24, "width": 24}).save_pretrained(folder)
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__ == "TimmWrapperImageProcessor"

    config = AutoConfig.from_pretrained(folder)
    compat.drop_timm_pretrained_cfg(config)
    config.save_pretrained(folder)
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__ == "ViTImageProcessor"


def test_timm_config_still_prefers_its_saved_label_names(tmp_path):
    """-> compat.set_timm_label_names: a new head's names must also go into `label_names`."""
    folder = make_checkpoint("resnet", tmp_path / "old", num_labels=3)  # saved with old0, old1, old2
    loaded = AutoModelForImageClassification.from_pretrained(folder, id2label={0: "a", 1: "b", 2: "c"})
    loaded.save_pretrained(tmp_path / "new")
    assert AutoConfig.from_pretrained(tmp_path / "new").id2label[0] == "old0"

    compat.set_timm_label_names(loaded.config, ["a", "b", "c"])
    loaded.save_pretrained(tmp_path / "fixed")
    assert AutoConfig.from_pretrained(tmp_path / "fixed").id2label[0] == "a"


def test_no_split_modules_still_do_not_name_the_blocks(tiny_resnet, tiny_hf_resnet):
    """-> compat.set_fsdp_units: FSDP's auto-wrap reads `_no_split_modules`."""
    for path in (tiny_resnet, tiny_hf_resnet):
        model = AutoModelForImageClassification.from_pretrained(path)
        named = set(type(model)._no_split_modules or [])
        blocks = {type(m).__name__ for m in model.modules()} & set(compat.FSDP_UNITS)
        assert blocks and not blocks <= named, f"{type(model).__name__} names its blocks now: set_fsdp_units can go"
        compat.set_fsdp_units(model)
        assert set(model._no_split_modules) == blocks


def test_resnet_still_refuses_get_input_embeddings_and_accelerate_still_asks(tiny_hf_resnet):
    """-> compat.set_fsdp_units: accelerate's FSDP2 preparation asks every model for its input embeddings."""
    from accelerate.utils import fsdp_utils

    model = AutoModelForImageClassification.from_pretrained(tiny_hf_resnet)
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    assert "get_input_embeddings" in inspect.getsource(fsdp_utils.fsdp2_prepare_model), "accelerate no longer asks"
    compat.set_fsdp_units(model)
    assert model.get_input_embeddings() is None


def test_batch_norm_classes_still_share_the_private_base():
    """-> compat.is_batch_norm (freezing keeps frozen BatchNorm statistics)."""
    for cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm):
        assert compat.is_batch_norm(cls(4))
    assert not compat.is_batch_norm(torch.nn.LayerNorm(4))


def test_deepspeed_dtype_is_still_where_it_is_read():
    """-> compat.deepspeed_dtype (the attributes; tests/test_scale_out.py runs it in its DeepSpeed runs)."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    assert "hf_ds_config" in {f.name for f in dataclasses.fields(DeepSpeedPlugin)}
    assert callable(getattr(HfTrainerDeepSpeedConfig, "dtype", None))
    assert inspect.signature(HfTrainerDeepSpeedConfig.dtype).parameters.keys() == {"self"}


def test_accelerate_launch_parser_still_lists_its_options():
    """-> compat.accelerate_launch_keys (check-config flags keys accelerate would ignore)."""
    keys = compat.accelerate_launch_keys()
    assert {"num_processes", "mixed_precision", "zero_stage", "fsdp_sharding_strategy"} <= keys


def test_dataset_fingerprint_still_tracks_content_and_transforms():
    """-> compat.dataset_fingerprint (the teacher-logit cache is keyed by it)."""
    from datasets import Dataset

    a, b = Dataset.from_dict({"x": [1, 2, 3]}), Dataset.from_dict({"x": [1, 2, 4]})
    assert isinstance(compat.dataset_fingerprint(a), str)
    assert compat.dataset_fingerprint(a) != compat.dataset_fingerprint(b)
    assert compat.dataset_fingerprint(a.select([0, 1])) != compat.dataset_fingerprint(a.select([1, 2]))


def test_every_workaround_names_its_library_versions_and_a_canary_that_exists():
    own = {n for n in dir(compat) if callable(getattr(compat, n)) and not n.startswith("_")
           and getattr(getattr(compat, n), "__module__", "") == "hf_transfer.integrations.compat"} - {"check_versions",
                                                                                 "warn_untested_versions"}
    assert own <= set(compat.WORKAROUNDS), own - set(compat.WORKAROUNDS)
    tests = {name for name in globals() if name.startswith("test_")}
    for workaround, (library, canary) in compat.WORKAROUNDS.items():
        assert library in compat.TESTED and canary in tests, workaround


def versions(**given):
    """An `installed` for check_versions: the newest version checked of each library, or the one given (None: not
    installed). It never reads the environment: what is installed is for the canaries above to judge."""
    from importlib.metadata import PackageNotFoundError

    def installed(name):
        found = given.get(name, compat.TESTED[name][1])
        if found is None:
            raise PackageNotFoundError(name)
        return found

    return installed


@pytest.mark.parametrize("given", [
    {}, {"transformers": "5.24.3"}, {"transformers": "5.24.0.post1"}, {"torch": "2.14.1+cu130"},
    {"transformers": "5.0.0"}, {"accelerate": "1.2.0"}, {"wandb": None}, {"timm": "1.9.0"},  # no workaround on timm
])
def test_versions_that_were_checked_give_no_line(given):
    assert compat.check_versions(versions(**given)) is None


@pytest.mark.parametrize("given, named", [
    ({"transformers": "5.25.0"}, "transformers 5.25.0 (checked 5.0 to 5.24)"),
    ({"transformers": "5.25.0rc1"}, "transformers 5.25.0rc1 (checked 5.0 to 5.24)"),  # a pre-release of a newer one
    ({"transformers": "6.0.0.dev0"}, "transformers 6.0.0.dev0 (checked 5.0 to 5.24)"),
    ({"torch": "2.3.1"}, "torch 2.3.1 (checked 2.4 to 2.14)"),  # older than the oldest
    ({"accelerate": "1.17.0", "wandb": None}, "accelerate 1.17.0 (checked 1.2 to 1.16)"),
])
def test_a_version_outside_the_checked_range_is_named_with_its_range(given, named):
    line = compat.check_versions(versions(**given))
    assert line == (f"library versions the project's workarounds were not checked with: {named}; if something fails "
                    "or looks wrong, python -m pytest tests/test_compat.py says which workaround no longer holds")


def test_several_libraries_outside_their_range_are_one_line_not_one_per_workaround(monkeypatch):
    line = compat.check_versions(versions(transformers="5.30.0", accelerate="1.17.0", huggingface_hub="3.0"))
    assert "\n" not in line and line.count("python -m pytest") == 1
    assert ": transformers 5.30.0 (checked 5.0 to 5.24), accelerate 1.17.0 (checked 1.2 to 1.16), huggingface_hub " \
           "3.0 (checked 1.0 to 2.4); " in line
    monkeypatch.setitem(compat.TESTED, "wandb", ("0.19", "0.31.2"))  # a newest with three numbers covers only itself
    assert compat.check_versions(versions(wandb="0.31.2")) is None
    assert "wandb 0.31.3 (checked 0.19 to 0.31.2)" in compat.check_versions(versions(wandb="0.31.3"))


def test_the_line_is_logged_by_the_main_process_only_and_can_be_turned_off(monkeypatch, caplog):
    monkeypatch.setattr(compat, "version", versions(accelerate="1.17.0"))
    with caplog.at_level(logging.WARNING, logger="hf_transfer.integrations.compat"):
        assert compat.warn_untested_versions({"RANK": "1"}) is None
        assert compat.warn_untested_versions({"HF_TRANSFER_NO_VERSION_WARNING": "1"}) is None
        assert caplog.records == []
        line = compat.warn_untested_versions({"RANK": "0"})
    assert "accelerate 1.17.0" in line and [r.getMessage() for r in caplog.records] == [line]


def test_printer_callback_still_pops_total_flos_from_the_logs_it_is_given():
    """-> workflow.train_and_evaluate reads total_flos from trainer.state."""
    from transformers.trainer_callback import PrinterCallback, TrainerControl, TrainerState

    logs = {"loss": 1.0, "total_flos": 5.0}
    PrinterCallback().on_log(TrainingArguments(output_dir="x", report_to="none"), TrainerState(), TrainerControl(),
                             logs=logs)
    assert "total_flos" not in logs, "PrinterCallback leaves the logs alone now: read the metrics' own total_flos"


def test_trainer_still_pushes_during_training_through_push_from_checkpoint():
    """-> TransferTrainer._push_from_checkpoint (one push path)."""
    assert "_push_from_checkpoint" in inspect.getsource(Trainer._save_checkpoint)
    assert list(inspect.signature(Trainer._push_from_checkpoint).parameters) == ["self", "checkpoint_folder"]


@pytest.mark.parametrize("case", ["nothing", "netrc", "netrc-other-host", "api-key", "base-url"])
def test_wandb_still_finds_credentials_where_the_public_rules_say(case, tmp_path, monkeypatch):
    """-> compat.wandb_has_credentials: its rules (environment, netrc for wandb's host) against wandb's own lookup
    (a private function of wandb 0.31, asked here only)."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    key = "0123456789" * 4
    if case.startswith("netrc"):
        host = "api.wandb.ai" if case == "netrc" else "example.com"
        netrc.write_text(f"machine {host}\n  login user\n  password {key}\n")
        netrc.chmod(0o600)
    if case == "api-key":
        monkeypatch.setenv("WANDB_API_KEY", key)
    if case == "base-url":
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
        netrc.write_text(f"machine wandb.example.com\n  login user\n  password {key}\n")
        netrc.chmod(0o600)
    wandb_setup.teardown()
    try:
        host = wandb_setup.singleton().settings.base_url
        theirs = wbauth.authenticate_session(host=host, source="canary", prompt=False, update_session=False) is not None
    finally:
        wandb_setup.teardown()
    assert compat.wandb_has_credentials() == theirs == (case != "nothing" and case != "netrc-other-host")


def test_hf_argument_parser_still_passes_unknown_metadata_to_argparse():
    """-> compat.field_for_argparse, arguments.ArgumentParser._parse_dataclass_field."""
    from transformers import HfArgumentParser

    from hf_transfer.config.flags import ArgumentParser

    @dataclasses.dataclass
    class Flags:
        rate: float = dataclasses.field(default=0.1, metadata={"shapes": True, "help": "a rate"})

    with pytest.raises(TypeError, match="shapes"):
        HfArgumentParser(Flags)
    assert list(inspect.signature(HfArgumentParser._parse_dataclass_field).parameters) == ["parser", "field"]
    (flags,) = ArgumentParser((Flags,)).parse_args_into_dataclasses(["--rate", "0.5"])
    assert flags.rate == 0.5 and dataclasses.fields(Flags)[0].metadata["shapes"] is True


def test_trainer_still_saves_checkpoints_through_save_checkpoint():
    """-> TransferTrainer._save_checkpoint (the weight EMA is written into every checkpoint before its state)."""
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    source = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert "self._save_checkpoint(" in source


def test_trainer_still_keeps_the_first_of_a_tie_in_determine_best_metric(tiny_vit, tmp_path):
    """-> TransferTrainer._determine_best_metric, selection.EarlyStopping: the Trainer asks it after each evaluation
    in training (and saves by its answer with save_strategy best); it and the early-stopping callback replace the
    best only on a strictly better metric, so a tie keeps the first checkpoint."""
    from transformers import EarlyStoppingCallback, TrainerControl

    assert list(inspect.signature(Trainer._determine_best_metric).parameters) == ["self", "metrics", "trial"]
    source = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert "self._determine_best_metric(metrics=metrics, trial=trial)" in source
    assert "self.control.should_save = is_new_best_metric" in source
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, eval_strategy="epoch",
                             save_strategy="epoch", metric_for_best_model="accuracy")
    trainer = Trainer(model=AutoModelForImageClassification.from_pretrained(tiny_vit), args=args, eval_dataset=[{}])
    stopper = EarlyStoppingCallback(early_stopping_patience=1)
    for step in (1, 2):
        trainer.state.global_step = step
        stopper.on_evaluate(args, trainer.state, TrainerControl(), {"eval_accuracy": 1.0})
        assert trainer._determine_best_metric(metrics={"eval_accuracy": 1.0}, trial=None) is (step == 1)
    assert trainer.state.best_global_step == 1 and stopper.early_stopping_patience_counter == 1


def test_trainer_still_takes_the_loss_counts_we_give_it():
    """-> TransferTrainer.get_batch_samples / loss_is_scaled_for_ga: the Trainer passes what get_batch_samples
    returns to compute_loss untouched, and divides by the accumulation steps unless told the loss is scaled."""
    assert Trainer.loss_is_scaled_for_ga is None
    loop = inspect.getsource(Trainer._run_epoch) if hasattr(Trainer, "_run_epoch") else inspect.getsource(Trainer)
    assert "self.get_batch_samples(" in loop and "self.training_step(model, inputs, num_items_in_batch)" in loop
    step = inspect.getsource(Trainer.training_step)
    assert "self.loss_is_scaled_for_ga" in step and "compute_loss(model, inputs, num_items_in_batch=" in step


def test_going_offline_after_import_still_stops_every_request(monkeypatch, tmp_path):
    """-> compat.go_offline: huggingface_hub, transformers and datasets read the module constants it sets."""
    import datasets.config
    from huggingface_hub import constants, is_offline_mode

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    compat.go_offline()
    assert is_offline_mode() and datasets.config.HF_HUB_OFFLINE
    with pytest.raises(OSError, match="cached files|offline"):
        AutoConfig.from_pretrained("someone/not-cached-anywhere", cache_dir=str(tmp_path))


def test_accelerate_still_imports_deepspeed_which_still_warns_without_an_accelerator(monkeypatch):
    """-> compat.tell_deepspeed_the_accelerator: every Trainer imports deepspeed (when installed), and deepspeed's
    accelerator detection warns on a machine without one unless DS_ACCELERATOR says which."""
    from accelerate.utils import other

    assert "from deepspeed import" in inspect.getsource(other.extract_model_from_parallel), "accelerate no longer does"
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import real_accelerator

    if torch.accelerator.is_available():
        pytest.skip("deepspeed finds this machine's accelerator: it has nothing to warn about")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("DeepSpeed").addHandler(handler)
    try:
        for tell in (False, True):
            monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detect again
            monkeypatch.setenv("DS_ACCELERATOR", "unset")
            monkeypatch.delenv("DS_ACCELERATOR")
            if tell:
                told = {}
                compat.tell_deepspeed_the_accelerator(told)
                monkeypatch.setenv("DS_ACCELERATOR", told["DS_ACCELERATOR"])
            assert real_accelerator.get_accelerator()._name == "cpu"
    finally:
        logging.getLogger("DeepSpeed").removeHandler(handler)
    assert [line for line in lines if "Setting accelerator to CPU" in line] == [lines[0]], lines


def test_from_pretrained_still_logs_a_table_for_a_new_head(tiny_resnet):
    """-> compat.HeldLoadReport: models.loading.load_model says a new head in one line, and shows the table only
    for weights outside it (output_loading_info names them)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        AutoModelForImageClassification.from_pretrained(tiny_resnet, num_labels=5, ignore_mismatched_sizes=True)
        assert [r.name for r in records if "LOAD REPORT" in r.getMessage()] == [compat.HeldLoadReport.LOGGER]
        records.clear()
        with compat.HeldLoadReport() as held:
            _, loading = AutoModelForImageClassification.from_pretrained(
                tiny_resnet, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
        assert not records and len(held.records) == 1
        held.show()
        assert records == held.records
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert {key for key, *_ in loading["mismatched_keys"]} == {"timm_model.fc.weight", "timm_model.fc.bias"}  # the head
