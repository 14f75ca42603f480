"""The data check (hf_transfer/data/check.py): leaks, duplicates, hidden and unreadable files, classes; at the start
of a run and as `python -m hf_transfer check-data`."""

import json

import numpy as np
import pytest
from faulty_data import faulty_digits
from helpers import colour_dataset, make_checkpoint

from hf_transfer.data import check as data_check
from hf_transfer.data.check import check_image_data
from hf_transfer.data.dataset import load_image_data
from hf_transfer.errors import UserError, run_cli


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return faulty_digits(tmp_path_factory.mktemp("faulty"))


@pytest.fixture(scope="module")
def faulty_data(faulty):
    return load_image_data(train_dir=faulty.train, validation_dir=faulty.validation, test_dir=faulty.test)


def duplicate_pairs(report, kind):
    """(train file, test file) of each duplicate finding of `kind` that spans train and test."""
    pairs = set()
    for finding in report["findings"]:
        if finding["check"] == kind:
            files = {image["split"]: image["file"] for image in finding["images"]}
            if {"train", "test"} <= set(files):
                pairs.add((files["train"], files["test"]))
    return pairs


def test_every_leak_is_found_exact_and_near_and_no_clean_pair_is_taken_for_one(faulty, faulty_data):
    report = check_image_data(faulty_data, input_size=32)
    exact = {(leak.train_file, leak.test_file) for leak in faulty.leaks if leak.kind == "exact"}
    near = {(leak.train_file, leak.test_file) for leak in faulty.leaks if leak.kind == "near"}
    assert report["leaks"] == {"exact": 20, "near": 10}
    assert duplicate_pairs(report, "exact_duplicate") == exact  # each copy found, nothing else
    assert duplicate_pairs(report, "near_duplicate") == near  # after a resize to 40 px and a JPEG re-encode
    flagged = [f for f in report["findings"] if f["check"].endswith("_duplicate")]
    assert len(flagged) == 30  # and no pair of other splits (validation), nor within a split
    # The clean pairs: no image of the 1,258 non-leaked training images is within reach of a test image, although
    # 8x8 digits of one class look alike (hundreds of their pHashes are 8 bits or less apart).
    rng = np.random.default_rng(0)
    leaked = {f for pair in exact | near for f in pair}
    scans = {split: data_check.scan_split(getattr(faulty_data, split), "image", "label", split)
             for split in ("train", "test")}
    clean_train = [i for i, f in enumerate(scans["train"].files) if f not in leaked]
    clean_test = [i for i, f in enumerate(scans["test"].files) if f not in leaked]
    sample = [(int(rng.choice(clean_train)), int(rng.choice(clean_test))) for _ in range(2000)]
    train, test = scans["train"], scans["test"]
    assert all(train.digests[i] != test.digests[j] for i, j in sample)
    differences = [np.abs(train.thumbs[i].astype(int) - test.thumbs[j].astype(int)).mean() for i, j in sample]
    assert min(differences) > data_check.NEAR_PIXELS


def test_without_near_duplicate_detection_the_re_encoded_leaks_are_missed(faulty_data):
    """What the near half adds: the 10 resized JPEG copies have other pixels than their originals."""
    report = check_image_data(faulty_data, input_size=32, near=False)
    assert report["leaks"] == {"exact": 20, "near": 0}


def test_hidden_files_unreadable_images_and_a_class_in_one_split_are_reported(tmp_path):
    parts = colour_dataset(n_per_class=4, names=("red", "green", "blue"), splits=("train", "validation", "test"))
    for split, ds in parts.items():
        for i, (image, label) in enumerate(zip(ds["img"], ds["label"])):
            name = ("red", "green", "blue")[label]
            if split != "train" and name == "blue":
                continue  # blue: training images only
            (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / split / name / f"{i}.png")
    checkpoints = tmp_path / "train" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    parts["train"]["img"][0].save(checkpoints / "0-checkpoint.png")
    (tmp_path / "train" / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")

    data = load_image_data(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"),
                           test_dir=str(tmp_path / "test"))
    assert data.label_names == ["blue", "green", "red"]  # the hidden folder is not a class
    report = check_image_data(data, input_size=64, folders=[str(tmp_path / "train")])
    by_check = {}
    for finding in report["findings"]:
        by_check.setdefault(finding["check"], []).append(finding)
    assert sorted(f["path"] for f in by_check["hidden_file"]) == [str(checkpoints), str(tmp_path / "train/red/.DS_Store")]
    assert [image["file"] for f in by_check["unreadable"] for image in f["images"]] == [
        str(tmp_path / "train" / "green" / "broken.png")]
    assert [f["class"] for f in by_check["class_in_one_split"]] == ["blue"]
    assert {f["class"] for f in by_check["few_images"]} == {"blue", "green", "red"}
    assert sum(len(f["images"]) for f in by_check["too_small"]) == sum(s["images"] for s in report["splits"].values()) - 1


def test_a_hidden_folder_is_not_counted_as_a_class_folder(tmp_path):
    for name in ("red", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
        colour_dataset(n_per_class=1, splits=("train",))["train"]["img"][0].save(tmp_path / name / "0.png")
    with pytest.raises(UserError, match=r"has 1 class folder\(s\) \(red\)"):
        load_image_data(train_dir=str(tmp_path))


@pytest.fixture(scope="module")
def resnet_16px(tmp_path_factory):
    return make_checkpoint("resnet", tmp_path_factory.mktemp("resnet-16px"), image_size=16, num_labels=10)


def run_flags(faulty, resnet, out):
    return ["--model_name_or_path", resnet, "--from_scratch", "--train_dir", faulty.train, "--validation_dir",
            faulty.validation, "--test_dir", faulty.test, "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--report_to", "none", "--min_train_steps", "0", "--min_seen_images", "0", "--max_eval_samples", "40"]


def test_a_run_writes_the_data_check_and_carries_the_leak_counts(faulty, resnet_16px, tmp_path, caplog):
    import run_finetune

    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        results = run_finetune.main(run_flags(faulty, resnet_16px, out))
    report = json.loads((out / "data_check.json").read_text())
    # --max_eval_samples 40: the run checks the test images it evaluates, the leaks among them
    leaked = {leak.test_file for leak in faulty.leaks}
    tested = {image["file"] for f in report["findings"] if f["check"].endswith("_duplicate") for image in f["images"]
              if image["split"] == "test"}
    assert report["splits"]["test"]["images"] == 40 and tested <= leaked
    assert results["data_leaks_exact"] + results["data_leaks_near"] == len(tested) > 0
    saved = json.loads((out / "all_results.json").read_text())
    assert (saved["data_leaks_exact"], saved["data_leaks_near"]) == (report["leaks"]["exact"], report["leaks"]["near"])
    assert f"Data check: {len(tested)} validation/test images" in (out / "README.md").read_text()
    assert (out / "data_check.html").read_text().count("data:image/png;base64,") >= 2 * len(tested)
    assert any("data check:" in r.message and "leaks" in r.message for r in caplog.records)


def test_on_data_leak_stop_ends_the_run_before_training_in_one_line(faulty, resnet_16px, tmp_path, capsys):
    import run_finetune

    out = tmp_path / "run"
    code = run_cli(run_finetune.main, [*run_flags(faulty, resnet_16px, out), "--on_data_leak", "stop",
                                       "--max_eval_samples", "400"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "30 validation/test image(s) are also in an earlier split (20 exact, 10 near" in err[0]
    assert str(out / "data_check.json") in err[0]
    assert not list(out.glob("checkpoint-*")) and not (out / "all_results.json").exists()


def test_check_data_writes_its_files_and_refuses_a_misspelt_flag_in_one_line(faulty, tmp_path, capsys):
    from hf_transfer.cli.tools import main

    out = tmp_path / "check"
    assert run_cli(main, ["check-data", "--train_dir", faulty.train, "--test_dir", faulty.test, "--output_dir",
                          str(out)]) == 0
    report = json.loads((out / "data_check.json").read_text())
    assert report["leaks"] == {"exact": 20, "near": 10}  # validation carved out of train: the leaks all in test
    assert (out / "data_check.html").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["check-data", "--train_dri", faulty.train, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "did you mean --train_dir?" in err[0]


def test_check_data_refuses_an_output_dir_that_is_a_file_in_one_line(faulty, tmp_path, capsys):
    """--output_dir naming an existing file ended in a FileExistsError traceback after the whole check."""
    from hf_transfer.cli.tools import main

    taken = tmp_path / "notes.txt"
    taken.write_text("the user's")
    code = run_cli(main, ["check-data", "--train_dir", faulty.train, "--output_dir", str(taken)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --output_dir '{taken}' exists and is not a directory"]
    assert taken.read_text() == "the user's"
