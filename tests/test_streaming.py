"""--streaming (data/streaming.py): real learning from a stream of shards, every image once per epoch across
processes, a killed run that resumes the stream exactly, bad shards and images skipped and counted, refusals."""

import json
import logging
from pathlib import Path

import pytest
from conftest import quick_flags
from datasets import ClassLabel, DatasetDict, Value
from helpers import colour_dataset, make_checkpoint
from test_reliability import assert_identical, start, wait_for

import run_distill
import run_finetune
from hf_transfer.data.samples import attach_transforms
from hf_transfer.data.sources import digits_dataset
from hf_transfer.data.streaming import load_streaming_data
from hf_transfer.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def write_shards(root: Path, data: DatasetDict, train_shards: int) -> str:
    """A local data set as the Hub stores one: the train split in `train_shards` Parquet files, the others in one."""
    (root / "data").mkdir(parents=True)
    for split, part in data.items():
        n = train_shards if split == "train" else 1
        for k in range(n):
            part.shard(n, k, contiguous=True).to_parquet(str(root / "data" / f"{split}-{k:05d}-of-{n:05d}.parquet"))
    return str(root)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """scikit-learn's real digits, train in 4 shards (no validation split: it is held out from the stream)."""
    return write_shards(tmp_path_factory.mktemp("digits-shards"), digits_dataset(), 4)


@pytest.fixture(scope="module")
def digits_resnet(tmp_path_factory):
    return make_checkpoint("resnet", tmp_path_factory.mktemp("digits-resnet"), num_labels=10)


def trained_rows(monkeypatch, nan_at: int | None = None) -> list[int]:
    """The rows of every training batch the model was given, counted where the trainer takes them (the stream's
    own count is checked against these); with `nan_at`, that batch (1-based) becomes NaN."""
    from hf_transfer.trainers.transfer_trainer import TransferTrainer

    rows, prepare = [], TransferTrainer._prepare_inputs

    def recorded(self, inputs):
        prepared = prepare(self, inputs)
        if self.model.training:
            rows.extend(inputs["row_index"].tolist())
            if nan_at is not None and len(rows) == nan_at * len(inputs["row_index"]):
                prepared["pixel_values"] = prepared["pixel_values"] * float("nan")
        return prepared

    monkeypatch.setattr(TransferTrainer, "_prepare_inputs", recorded)
    return rows


def stream_flags(data, out, *extra):
    """A model from scratch (give its flag), --max_steps 60 of batch 32 from the stream."""
    return ["--from_scratch", "--dataset_name", data, "--streaming", "--max_steps", "60",
            "--output_dir", str(out), "--learning_rate", "0.05", "--max_eval_samples", "100", "--seed", "3",
            *quick_flags(), "--per_device_train_batch_size", "32", *extra]


@pytest.mark.slow
def test_a_stream_of_real_digits_trains_and_counts_what_it_read(digits_shards, digits_resnet, tmp_path, monkeypatch):
    out = tmp_path / "run"
    rows = trained_rows(monkeypatch)
    results = run_finetune.main(["--model_name_or_path", digits_resnet, *stream_flags(digits_shards, out)])
    assert results["test_accuracy"] >= 0.9  # chance is 0.1; only learning from the stream gets here
    assert results["train_streamed_images"] == len(rows) == 60 * 32
    assert results["train_skipped_shards"] == results["train_skipped_images"] == 0
    assert results["eval_samples"] == 100 and results["test_samples"] == 100  # bounded by --max_eval_samples
    position = json.loads((out / "checkpoint-60" / "stream-0.json").read_text())
    assert position["batches"] == 60 and position["processes"] == 1
    # 60 x 32 images from the 1,337 not held out for validation: the stream is in its second epoch
    assert position["positions"]["0"][1] == 1

    # The fine-tuned model teaches a student at half the resolution through the same stream.
    rows.clear()
    student = run_distill.main(["--teacher_model_name_or_path", str(out), "--student_model_name_or_path", digits_resnet,
                                *stream_flags(digits_shards, tmp_path / "student", "--image_size", "16")])
    assert student["test_accuracy"] >= 0.9 and student["test_agreement"] >= 0.9
    assert student["train_streamed_images"] == len(rows) == 60 * 32


def epoch_rows(data_dir: str, rank: int, world: int, workers: int, batches: int, cache: Path) -> list[tuple]:
    """(row id, stream epoch) of what one process's DataLoader delivers in its first `batches` batches."""
    data = load_streaming_data(data_dir, None, None, None, 8, 0, 5, False, str(cache))
    attach_transforms(data, "none")

    class Args:
        process_index, world_size, dataloader_num_workers = rank, world, workers
        dataloader_pin_memory, dataloader_persistent_workers, dataloader_prefetch_factor = False, False, 2

    loader = data.train.loader(4, lambda samples: [(s["row_index"], s["stream"][1]) for s in samples], Args)
    return [sample for _, batch in zip(range(batches), loader) for sample in batch]


@pytest.mark.parametrize("train_shards, workers", [(4, 2), (1, 1)], ids=["shards-dealt", "one-shard-strided"])
def test_every_image_is_read_once_per_epoch_by_one_process(train_shards, workers, tmp_path):
    """2 processes (x 2 DataLoader workers where there are shards enough): each image of an epoch is read exactly
    once, by one of them; with one shard, each process keeps every other row. 8 of the 60 rows are held out for
    validation and never trained on."""
    data_dir = write_shards(tmp_path / "data", colour_dataset(n_per_class=20, size=8, splits=("train",)), train_shards)
    seen = [row for rank in (0, 1) for row in epoch_rows(data_dir, rank, 2, workers, 20, tmp_path / "cache")]
    epoch_0 = sorted(row for row, epoch in seen if epoch == 0)
    shard_rows = [range(8, 15), range(15), range(15), range(15)] if train_shards == 4 else [range(8, 60)]
    assert epoch_0 == sorted(shard << 32 | row for shard, rows in enumerate(shard_rows) for row in rows)
    epoch_1 = [row for row, epoch in seen if epoch == 1]
    assert epoch_1 and len(set(epoch_1)) == len(epoch_1) and set(epoch_1) <= set(epoch_0)


@pytest.mark.slow
def test_two_processes_stream_every_image_of_an_epoch_once(tiny_resnet, tmp_path):
    """accelerate launch, 2 processes on the CPU: 4 shards of 16, batches of 4, 8 steps = one epoch per process."""
    from test_distributed import launch

    data = colour_dataset(n_per_class=16, size=8, names=("a", "b", "c", "d"), splits=("train", "validation"))
    data_dir = write_shards(tmp_path / "data", data, 4)
    out = tmp_path / "two"
    proc = launch(tmp_path, "finetune", ["--model_name_or_path", tiny_resnet, "--dataset_name", data_dir,
                                         "--streaming", "--max_steps", "8", "--output_dir", str(out), *quick_flags(),
                                         "--per_device_train_batch_size", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "rows" / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    rows = [row for rank in ranks for step in rank for row in step]
    assert sorted(rows) == sorted(shard << 32 | row for shard in range(4) for row in range(16))
    assert json.loads((out / "all_results.json").read_text())["train_streamed_images"] == 64
    assert {p.name for p in (out / "checkpoint-8").glob("stream-*.json")} == {"stream-0.json", "stream-1.json"}


def resume_flags(model, data, out):
    """12 steps from a stream of 4 shards read by 2 DataLoader workers in blocks of 5, with augmentation: a
    resumed run must put each worker back on its slot, re-read its block and skip what was trained on."""
    return ["--model_name_or_path", model, "--dataset_name", data, "--streaming", "--output_dir", str(out),
            "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
            "--eval_steps", "2", "--save_total_limit", "20", "--seed", "7", "--augmentation", "basic+randaugment",
            "--shuffle_buffer", "5", *quick_flags(), "--per_device_train_batch_size", "4",
            "--dataloader_num_workers", "2"]


@pytest.mark.slow
def test_sigkill_mid_stream_then_the_same_command_goes_on_where_it_stopped(tiny_resnet, tmp_path, monkeypatch):
    data = colour_dataset(n_per_class=16, splits=("train", "validation", "test"))
    data_dir = write_shards(tmp_path / "data", data, 4)
    monkeypatch.setenv("TEST_ROWS_DIR", str(tmp_path / "rows-reference"))
    reference = start(resume_flags(tiny_resnet, data_dir, tmp_path / "reference"), log=tmp_path / "reference.log")

    out = tmp_path / "run"
    monkeypatch.setenv("TEST_ROWS_DIR", str(tmp_path / "rows-killed"))
    process = start(resume_flags(tiny_resnet, data_dir, out), sleep=0.3)
    wait_for(out / "checkpoint-4", process)
    process.kill()
    process.wait()
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    monkeypatch.setenv("TEST_ROWS_DIR", str(tmp_path / "rows-resumed"))
    again = start(resume_flags(tiny_resnet, data_dir, out))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resuming from checkpoint" in err

    expected = json.loads((tmp_path / "rows-reference" / "rows-rank0.json").read_text())
    resumed = json.loads((tmp_path / "rows-resumed" / "rows-rank0.json").read_text())
    assert 0 < len(resumed) < len(expected) and resumed == expected[-len(resumed):]  # not from the start: on
    assert_identical(tmp_path / "reference", out)
    # The count of streamed images is the whole run's: those trained on before the kill come from the checkpoint.
    streamed = [json.loads((run / "all_results.json").read_text())["train_streamed_images"]
                for run in (tmp_path / "reference", out)]
    assert streamed == [sum(len(step) for step in expected)] * 2


def broken_stream(tmp_path) -> str:
    """4 shards; shard 2 cut in half (not Parquet any more), and row 3 of shard 1 not an image."""
    data = colour_dataset(n_per_class=16, size=8, splits=("train", "validation"))
    data["train"] = data["train"].cast_column("img", data["train"].features["img"].__class__(decode=False))
    data["train"] = data["train"].map(lambda row, i: {"img": {"bytes": b"not an image", "path": None}} if i == 15 else row,
                                      with_indices=True)
    root = write_shards(tmp_path / "data", data, 4)
    shard = Path(root) / "data" / "train-00002-of-00004.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return root


def test_bad_shards_and_images_in_a_stream_are_skipped_and_counted(tiny_resnet, tmp_path, capsys, monkeypatch):
    data_dir = broken_stream(tmp_path)
    flags = ["--model_name_or_path", tiny_resnet, "--dataset_name", data_dir, "--streaming", "--max_steps", "6",
             *quick_flags()]
    rows = trained_rows(monkeypatch)
    results = run_finetune.main([*flags, "--output_dir", str(tmp_path / "skip"), "--skip_corrupt_images"])
    assert results["train_skipped_shards"] >= 1 and results["train_skipped_images"] >= 1
    assert results["train_streamed_images"] == len(rows) == 6 * 8

    code = run_cli(run_finetune.main, [*flags, "--output_dir", str(tmp_path / "stop")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: cannot decode the image in shard 1 of the train stream, row 3"), err


def test_the_streamed_image_count_includes_a_step_skipped_for_a_nan_loss(tiny_resnet, tmp_path, monkeypatch):
    """--max_nan_steps skips the third step as if it never happened (nonfinite.py), but the stream delivered its
    images: 6 steps take 7 batches of 8, and the count is of images read, not of steps times the batch size."""
    data_dir = write_shards(tmp_path / "data", colour_dataset(n_per_class=16, size=8, splits=("train", "validation")), 2)
    rows = trained_rows(monkeypatch, nan_at=3)
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", data_dir, "--streaming",
                                 "--max_steps", "6", "--max_nan_steps", "1", "--output_dir", str(tmp_path / "out"),
                                 *quick_flags()])
    assert results["train_streamed_images"] == len(rows) == 7 * 8


@pytest.mark.parametrize("flags, message", [
    ([], "--streaming needs --max_steps"),
    (["--max_steps", "5", "--eval_strategy", "epoch"], "--streaming has no epochs to evaluate or save at"),
    (["--max_steps", "5", "--class_weights", "auto"], "--class_weights auto counts the labels of the whole train"),
    (["--max_steps", "5", "--max_train_samples", "10"], "--max_train_samples picks images from the whole train"),
    (["--max_steps", "5", "--validation_split", "0.2"], "--validation_split holds out a fraction of the whole train"),
    (["--max_steps", "5", "--train_val_split=0.1"], "--validation_split holds out a fraction of the whole train"),
])
def test_what_a_stream_cannot_do_is_refused_in_one_line(flags, message, tiny_resnet, tmp_path, capsys):
    code = run_cli(run_finetune.main, ["--model_name_or_path", tiny_resnet, "--dataset_name", str(tmp_path),
                                       "--streaming", "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_a_stream_reads_names_as_the_in_memory_path_does(tiny_resnet, tmp_path, monkeypatch, capsys):
    """One resolver (data/sources.py) for both paths: a built-in set is refused in one line, and so is a name that
    means a local folder but is none (before any Hub call), and a save_to_disk folder, which datasets cannot stream."""
    for name in ("digits", "digits-multilabel"):
        code = run_cli(run_finetune.main, ["--model_name_or_path", tiny_resnet, "--dataset_name", name, "--streaming",
                                           "--max_steps", "5", "--output_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == f"error: --streaming is for data sets larger than memory; '{name}' is " \
                                    f"{'1,797' if name == 'digits' else '2,500'} images: leave --streaming out", err
    (tmp_path / "runs").mkdir()
    digits_dataset().save_to_disk(str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="^--dataset_name 'runs/nope' is not a directory$"):
        load_streaming_data("runs/nope", None, None, None, 8, 0, 5, False)
    with pytest.raises(UserError, match="^'saved' is a save_to_disk folder, which datasets cannot stream"):
        load_streaming_data("saved", None, None, None, 8, 0, 5, False)


def test_a_stream_without_class_names_or_with_too_few_images_is_refused_before_training(tiny_resnet, tmp_path, capsys):
    data = colour_dataset(n_per_class=4, size=8, splits=("train",))["train"]
    named = data.cast_column("label", Value("string"))  # the names only, no ClassLabel: unknown until all is read
    for folder, part, message in (("strings", named, "--streaming needs the label names before the first image"),
                                  ("small", data, "the train split has 12 images, no more than the 100 held out")):
        data_dir = write_shards(tmp_path / folder, DatasetDict(train=part), 1)
        code = run_cli(run_finetune.main, ["--model_name_or_path", tiny_resnet, "--dataset_name", data_dir,
                                           "--streaming", "--max_steps", "5", "--max_eval_samples", "100",
                                           "--output_dir", str(tmp_path / folder / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith(f"error: {message}"), err


def test_a_bounded_validation_or_test_split_that_misses_classes_is_named_in_a_warning(tmp_path, caplog):
    """Streamed, validation and test are the first --max_eval_samples images in file order (drawing a stratified
    subset would read the whole stream): in a class-sorted data set the run says which classes they lack."""
    data = colour_dataset(n_per_class=8, size=8, splits=("train", "validation", "test"))
    data_dir = write_shards(tmp_path / "data", data, 2)
    with caplog.at_level(logging.WARNING):
        load_streaming_data(data_dir, None, None, None, 6, 0, 5, False, str(tmp_path / "cache"))
    for split in ("validation", "test"):
        assert (f"the {split} images (the first 6 of the {split} split, in file order) hold 1 of the 3 classes (none "
                "of green, blue)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_streaming_data(data_dir, None, None, None, 20, 0, 5, False, str(tmp_path / "cache"))
    assert "classes" not in caplog.text  # 20 images of each: every class


def test_the_cached_validation_split_follows_the_label_column_read(tmp_path):
    """Validation is read once into the cache; another --label_column reads it again (it was a stale entry without
    that column: `Column 'coarse' doesn't exist`)."""
    data = colour_dataset(n_per_class=8, size=8, splits=("train", "validation"))
    data = data.map(lambda b: {"coarse": [int(label > 0) for label in b["label"]]}, batched=True)
    data = data.cast_column("coarse", ClassLabel(names=["red", "other"]))
    data_dir = write_shards(tmp_path / "data", data, 2)
    for column, names in (("label", ["red", "green", "blue"]), ("coarse", ["red", "other"])):
        loaded = load_streaming_data(data_dir, None, None, column, 6, 0, 5, False, str(tmp_path / "cache"))
        assert loaded.label_names == names and column in loaded.validation.column_names


@pytest.mark.network
def test_cifar10_streams_from_the_hub(tiny_resnet, tmp_path, monkeypatch):
    """The Hub path: CIFAR-10's train split streamed, 50 validation images held out, the test split bounded."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    results = run_finetune.main(["--model_name_or_path", tiny_resnet, "--dataset_name", "uoft-cs/cifar10",
                                 "--streaming", "--max_steps", "4", "--max_eval_samples", "50",
                                 "--output_dir", str(tmp_path / "out"), *quick_flags()])
    assert results["train_streamed_images"] == 32 and results["test_samples"] == 50
