"""Loading, columns, splits and the uint8 sample path."""

import logging
import pickle
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from helpers import colour_dataset, png_bytes, random_images

from hf_transfer.data import samples
from hf_transfer.data.augmentation import Augmentation
from hf_transfer.data.batch import LABELS, PIXEL_VALUES, ROW_INDEX, SQUASH, Batch
from hf_transfer.data.dataset import ROW, load_image_data
from hf_transfer.data.samples import UInt8Collator, attach_transforms
from hf_transfer.data.sources import digits_dataset
from hf_transfer.errors import CorruptImageError, UserError
from hf_transfer.on_device.geometry import crop_and_flip
from hf_transfer.on_device.preprocessing import ImageSpec, resize_batch


def save(ds: DatasetDict, tmp_path) -> str:
    path = tmp_path / "ds"
    ds.save_to_disk(str(path))
    return str(path)


def test_cifar_schema_columns_and_labels(cifar_like):
    data = load_image_data(cifar_like, validation_split=0.25, seed=0)
    assert (data.image_column, data.label_column) == ("img", "label")
    assert data.label_names == ["red", "green", "blue"]
    assert data.validation_from_train
    assert len(data.train) + len(data.validation) == 48 and len(data.test) == 48
    # stratified: each class keeps its share in validation
    assert sorted(np.bincount(data.validation["label"]).tolist()) == [4, 4, 4]


def test_validation_split_is_seeded(cifar_like):
    rows = [load_image_data(cifar_like, seed=seed).validation[ROW] for seed in (1, 1, 2)]
    assert rows[0] == rows[1]
    assert rows[0] != rows[2]


def test_image_labels_variant_and_string_labels(tmp_path):
    ds = colour_dataset(n_per_class=3, image_key="image", label_key="labels")
    names = ds["train"].features["labels"].names
    as_strings = ds.map(lambda b: {"labels": [names[i] for i in b["labels"]]}, batched=True,
                        features=Features({"image": Image(), "labels": Value("string")}))
    data = load_image_data(save(as_strings, tmp_path))
    assert (data.image_column, data.label_column) == ("image", "labels")
    assert data.label_names == sorted(names)
    # the label of every row still names its colour
    for row in data.test.select(range(9)):
        assert data.label_names[row["labels"]] == as_strings["test"][row[ROW]]["labels"]


def test_missing_label_column_names_existing_columns(tmp_path):
    features = Features({"picture": Image(), "note": Value("string")})
    ds = DatasetDict(train=Dataset.from_dict({"picture": random_images(4), "note": ["a"] * 4}, features=features))
    with pytest.raises(UserError, match="cannot find the label column; the columns are: picture, note"):
        load_image_data(save(ds, tmp_path))


def test_explicit_columns_must_exist(cifar_like):
    with pytest.raises(UserError, match="--image_column 'pixels' does not exist; the columns are: img, label"):
        load_image_data(cifar_like, image_column="pixels")


def test_fewer_than_two_classes_is_an_error(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["only"])})
    ds = DatasetDict(train=Dataset.from_dict({"image": random_images(4), "label": [0] * 4}, features=features))
    with pytest.raises(UserError, match="1 class"):
        load_image_data(save(ds, tmp_path))


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_validation_split_range(cifar_like, fraction):
    with pytest.raises(UserError, match="--validation_split must be between 0 and 1"):
        load_image_data(cifar_like, validation_split=fraction)


def test_missing_local_dataset_is_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        load_image_data(str(tmp_path / "nope"))


def test_unreachable_hub_dataset_says_how_to_run_offline():
    with pytest.raises(UserError) as info:
        load_image_data("someone/not-a-real-dataset-for-tests")
    message = str(info.value)
    assert "someone/not-a-real-dataset-for-tests" in message and "HF_HUB_OFFLINE=1" in message
    assert "--dataset_name digits" in message and "\n" not in message


def test_image_folders(tmp_path):
    for split in ("train", "test"):
        for label, colour in enumerate(("cat", "dog")):
            folder = tmp_path / split / colour
            folder.mkdir(parents=True)
            for i, image in enumerate(random_images(3, size=20 + label * 4, seed=label)):
                image.save(folder / f"{i}.png")
    data = load_image_data(train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), validation_split=0.34)
    assert data.label_names == ["cat", "dog"]
    assert len(data.test) == 6
    attach_transforms(data, "basic")
    sample = data.test[0]
    assert sample["pixel_values"][0].dtype == torch.uint8


def test_grayscale_rgba_and_palette_become_rgb(tmp_path):
    rgba = PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    gray = PIL.Image.new("L", (4, 4), 77)
    palette = PIL.Image.new("RGB", (4, 4), (0, 0, 200)).convert("P")
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    train = Dataset.from_dict({"image": [rgba, gray, palette, gray], "label": [0, 1, 0, 1]}, features=features)
    ds = DatasetDict(train=train, test=train)
    data = load_image_data(save(ds, tmp_path))
    attach_transforms(data, augmentation="none")
    images = data.test[:3]["pixel_values"]
    assert all(image.shape == (3, 4, 4) and image.dtype == torch.uint8 for image in images)
    assert images[0].flatten().unique().tolist() == [255]  # transparent -> composited on white
    assert images[1].flatten().unique().tolist() == [77]
    assert images[2][2].min() > 190 and images[2][0].max() == 0  # palette (web-quantised) blue


def test_sixteen_bit_images_keep_their_range(tmp_path):
    array = np.full((4, 4), 40000, dtype=np.uint16)  # 61% of the 16-bit range
    image = PIL.Image.fromarray(array)
    assert image.mode.startswith("I;16")
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    ds = DatasetDict(train=Dataset.from_dict({"image": [image, image], "label": [0, 1]}, features=features))
    ds = DatasetDict(train=ds["train"], test=ds["train"])
    data = load_image_data(save(ds, tmp_path))
    attach_transforms(data, augmentation="none")
    assert data.test[0]["pixel_values"].flatten().unique().tolist() == [round(40000 * 255 / 65535)]  # 156


def test_corrupt_image_error_names_split_and_row(tmp_path):
    good = png_bytes(random_images(1)[0])
    cells = [{"bytes": good, "path": None}, {"bytes": good[:40], "path": None}, {"bytes": b"not an image", "path": None}]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    ds = DatasetDict(train=Dataset.from_dict({"image": cells * 2, "label": [0, 1, 0, 1, 0, 1]}, features=features))
    ds = DatasetDict(train=ds["train"], test=ds["train"])
    data = load_image_data(save(ds, tmp_path))
    attach_transforms(data, "basic", decode_once=False)  # each image decoded when a batch asks for it
    assert data.test[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(CorruptImageError, match="cannot decode the image in split 'test', row 1"):
        data.test[1]
    with pytest.raises(CorruptImageError, match="split 'test', row 2"):
        data.test[2]
    with pytest.raises(CorruptImageError, match=r"cannot decode the image in split '\w+', row \d"):
        attach_transforms(load_image_data(save(ds, tmp_path / "again")), "basic")  # decoded once: up front


def test_dataset_is_not_materialised(cifar_like):
    data = load_image_data(cifar_like)
    attach_transforms(data, "basic")
    # The stored table still holds the encoded files; pixels exist only when a batch is read.
    assert data.train.format["type"] == "custom"
    stored = data.train.with_format(None)[0]["img"]
    assert isinstance(stored["bytes"], bytes) and stored["bytes"][:4] == b"\x89PNG"


def test_collator_keeps_uint8_at_storage_size_and_resizes_only_mixed_sizes():
    collate = UInt8Collator(ImageSpec((40, 40), (0.5,) * 3, (0.5,) * 3))
    same = [{"pixel_values": torch.zeros(3, 32, 32, dtype=torch.uint8), "labels": i, "row_index": i} for i in range(4)]
    batch = collate(same)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].tolist() == [0, 1, 2, 3]
    mixed = same[:2] + [{"pixel_values": torch.zeros(3, 20, 28, dtype=torch.uint8), "labels": 0, "row_index": 9}]
    assert collate(mixed)["pixel_values"].shape == (3, 3, 40, 40)


def test_a_collated_batch_keeps_its_class_on_the_way_to_the_device():
    """accelerate and the Trainer move a batch by rebuilding it with type(batch)(...), DataLoader workers pickle it:
    the trainers still read it through `Batch`'s properties."""
    from types import SimpleNamespace

    from accelerate.utils import send_to_device
    from transformers import Trainer

    collate = UInt8Collator(ImageSpec((40, 40), (0.5,) * 3, (0.5,) * 3))
    batch = collate([{PIXEL_VALUES: torch.zeros(3, 32, 32, dtype=torch.uint8), LABELS: i, ROW_INDEX: i, SQUASH: True}
                     for i in range(2)])
    trainer = SimpleNamespace(args=SimpleNamespace(device=torch.device("cpu")), is_deepspeed_enabled=False)
    trainer._prepare_input = lambda data: Trainer._prepare_input(trainer, data)
    for moved in (send_to_device(batch, "cpu"), trainer._prepare_input(batch), pickle.loads(pickle.dumps(batch))):
        assert type(moved) is Batch and moved.squash and not moved.fitted and moved.row_index.tolist() == [0, 1]


def test_digits_is_real_and_fixed():
    digits = digits_dataset()
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert digits["train"].features["label"].names == [str(i) for i in range(10)]
    assert digits_dataset()["test"]["label"] == digits["test"]["label"]
    image = digits["test"][0]["image"]
    assert image.size == (8, 8) and np.asarray(image).max() > 200  # real strokes, scaled to 0..255


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_augmentation_presets_differ_between_draws(preset):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    augment = Augmentation(preset)
    draws = [augment(image) for _ in range(4)]
    assert all(d.shape == image.shape and d.dtype == torch.uint8 for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_augmentation_none_is_identity():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(Augmentation("none")(image), image)


def view(ds, i) -> torch.Tensor:
    """What the model is shown of row i: the sample, cropped and flipped on the device when it comes with parameters."""
    item = ds[i]
    if "augment" not in item:
        return item["pixel_values"]
    return crop_and_flip(item["pixel_values"][None], torch.tensor([item["augment"]]))[0]


@pytest.mark.parametrize("decode_once", [True, False])
def test_train_split_is_augmented_per_row_and_epoch_and_eval_splits_are_not(cifar_like, decode_once):
    data = load_image_data(cifar_like)
    attach_transforms(data, augmentation="basic", seed=1, decode_once=decode_once)
    assert ("augment" in data.train[0]) == decode_once  # decoded once: crops and flips go to the device, batched
    raw = load_image_data(cifar_like)
    attach_transforms(raw, augmentation="none", decode_once=decode_once)
    rows = range(6)
    epoch_0 = [view(data.train, i) for i in rows]
    assert all(torch.equal(a, view(data.train, i)) for i, a in zip(rows, epoch_0))  # (seed, epoch, row)
    assert any(not torch.equal(a, raw.train[i]["pixel_values"]) for i, a in zip(rows, epoch_0))  # augmented
    data.epoch.fill_(1)
    epoch_1 = [view(data.train, i) for i in rows]
    assert any(not torch.equal(a, b) for a, b in zip(epoch_0, epoch_1))  # a new view every epoch
    assert all(torch.equal(data.test[i]["pixel_values"], raw.test[i]["pixel_values"]) for i in rows)


def test_decoding_once_gives_the_pixels_decoding_each_time_gives(cifar_like):
    once, each = load_image_data(cifar_like), load_image_data(cifar_like)
    attach_transforms(once, "none")
    attach_transforms(each, "none", decode_once=False)
    assert all(torch.equal(once.train[i]["pixel_values"], each.train[i]["pixel_values"]) for i in range(len(once.train)))


def test_batched_crops_and_flips_are_the_transforms_with_those_draws():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    parameters = torch.tensor([[2, 0, 4, 0], [2, 4, 0, 1], [2, 2, 2, 0], [2, 1, 3, 1], [2, 4, 4, 1]])
    cut = crop_and_flip(images, parameters)
    for image, (padding, top, left, flip), got in zip(images, parameters.tolist(), cut):
        expected = torch.nn.functional.pad(image, (padding,) * 4)[:, top:top + 16, left:left + 16]
        assert torch.equal(got, expected.flip(-1) if flip else expected)
    flips = crop_and_flip(images, torch.tensor([[0, 0, 0, i % 2] for i in range(5)]))  # flips alone (no padding)
    assert all(torch.equal(got, image.flip(-1) if i % 2 else image) for i, (image, got) in enumerate(zip(images, flips)))
    draws = [Augmentation("basic").batch_parameters((32, 32), seed) for seed in range(4000)]
    assert {d[0] for d in draws} == {4}  # CIFAR's 4 px
    assert {d[1] for d in draws} == set(range(9)) and {d[2] for d in draws} == set(range(9))
    assert 0.45 < sum(d[3] for d in draws) / len(draws) < 0.55


def test_batches_are_channels_last_uint8():
    collate = UInt8Collator(ImageSpec((32, 32), (0.5,) * 3, (0.5,) * 3))
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(3)]
    batch = collate([{"pixel_values": im, "labels": 0, "row_index": i} for i, im in enumerate(images)])
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch["pixel_values"], torch.stack(images))


def test_in_memory_means_decoded_and_no_per_image_cpu_work(cifar_like):
    def in_memory(augmentation, **kwargs):
        data = load_image_data(cifar_like)
        attach_transforms(data, augmentation, **kwargs)
        return data.in_memory

    assert in_memory("none") and in_memory("basic")  # crops and flips run on the device
    assert not in_memory("basic", decode_once=False)
    assert not in_memory("randaugment")  # per image, on the CPU
    assert not in_memory("basic", random_erasing=0.25)


@pytest.mark.parametrize("decode_once", [True, False])
def test_without_a_gpu_workers_are_not_started_for_data_in_memory(tiny_resnet, cifar_like, tmp_path, caplog,
                                                                  decode_once):
    from hf_transfer.config.fitting import fit_workers
    from hf_transfer.trainers.transfer_config import TransferConfig

    data = load_image_data(cifar_like)
    attach_transforms(data, "basic", decode_once=decode_once)
    inputs = dict(output_dir=str(tmp_path), use_cpu=True, dataloader_num_workers=2, report_to="none")
    fits = {fit.flag: fit for fit in fit_workers(TransferConfig(**inputs), data.in_memory)}
    args = TransferConfig(**{**inputs, **{flag: fit.value for flag, fit in fits.items()}})
    if decode_once:  # a batch is a gather of rows in memory: workers would only take cores from the model
        assert args.dataloader_num_workers == 0 and not args.dataloader_persistent_workers
        assert "not 2: the images are decoded in memory" in str(fits["dataloader_num_workers"])
    else:  # they decode images: kept
        assert not fits and args.dataloader_num_workers == 2


def test_mixed_sizes_are_resized_once_per_model_and_shared_when_the_models_agree():
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 60), (50, 30), (64, 64))]
    examples = [{"pixel_values": image, "labels": i, "row_index": i} for i, image in enumerate(images)]
    student = ImageSpec((16, 16), (0.5,) * 3, (0.5,) * 3, "bicubic")
    teacher = ImageSpec((32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", resize=36)  # shorter edge 36, centre 32 x 32
    collate = UInt8Collator(student).with_view("teacher", teacher)
    batch = collate(examples)
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["view_teacher"].shape == (3, 3, 32, 32)
    assert batch["fitted"]  # each model's input already: the device neither resizes nor crops again
    for i, image in enumerate(images):  # each view straight from the stored image
        resized = resize_batch(image, teacher.resized_size(*image.shape[-2:]), "bilinear")
        top, left = (resized.shape[-2] - 32) // 2, (resized.shape[-1] - 32) // 2
        assert torch.equal(batch["view_teacher"][i], resized[:, top:top + 32, left:left + 32])
        assert torch.equal(batch["pixel_values"][i], resize_batch(image, (16, 16), "bicubic"))
    shared = UInt8Collator(student).with_view("teacher", replace(student, mean=(0.4,) * 3))(examples)
    assert shared["view_teacher"] is shared["pixel_values"]  # the same pixels, normalised otherwise on the device
    uniform = collate([{"pixel_values": images[2], "labels": 0, "row_index": 0}] * 2)
    assert "view_teacher" not in uniform and "fitted" not in uniform
    assert uniform["pixel_values"].shape[-1] == 64  # resized on the device


# ---------------------------------------------------------------- what is decoded into memory, decided cheaply


def image_rows(sizes: list[tuple[int, int]]) -> Dataset:
    """A split as load_image_data leaves it (encoded images, row numbers); image i is red i % 256, (width, height)."""
    cells = [{"bytes": png_bytes(PIL.Image.new("RGB", size, (i % 256, 0, 0))), "path": None}
             for i, size in enumerate(sizes)]
    return Dataset.from_dict({"image": cells, ROW: list(range(len(sizes)))},
                             features=Features({"image": Image(decode=False), ROW: Value("int64")}))


def test_deciding_what_to_decode_reads_a_sample_of_headers_not_every_file(monkeypatch):
    headers = []
    stored_size = samples._stored_size
    monkeypatch.setattr(samples, "_stored_size", lambda *args: headers.append(args) or stored_size(*args))
    mixed = image_rows([(8 + i % 5, 8) for i in range(1000)])
    assert samples.decode_split(mixed, "image", "train") is None and len(headers) <= samples.HEADER_SAMPLE

    uniform = samples.decode_split(image_rows([(8, 8)] * 1000), "image", "train")
    assert uniform.images.shape == (1000, 8, 8, 3) and uniform.images[:, 0, 0, 0].tolist() == [
        i % 256 for i in range(1000)]
    # An image of another size where the sample does not look: the decode itself finds it, and the split is
    # decoded per sample instead (the collator resizes mixed sizes).
    headers.clear()
    sizes = [(8, 8)] * 1000
    sizes[501] = (9, 8)
    assert samples.decode_split(image_rows(sizes), "image", "train") is None
    assert 501 not in {row for _, _, row in headers}


def test_the_decode_budget_is_per_machine_and_shared_by_the_splits(cifar_like, monkeypatch):
    def decoded_splits() -> dict[str, bool]:
        data = load_image_data(cifar_like)
        attach_transforms(data, "none")
        return {split: ds.format["format_kwargs"]["transform"].decoded is not None
                for split, ds in (("train", data.train), ("validation", data.validation), ("test", data.test))}

    data = load_image_data(cifar_like)
    image = 32 * 32 * 3
    monkeypatch.setattr(samples, "DECODE_BUDGET", image * (len(data.train) + len(data.validation)))
    assert decoded_splits() == {"train": True, "validation": True, "test": False}  # the test split did not fit
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine: half each
    assert len(data.train) * image > samples.DECODE_BUDGET // 2
    assert decoded_splits() == {"train": False, "validation": True, "test": False}


def test_class_folders_are_listed_as_datasets_imagefolder_reads_them_and_other_layouts_left_to_it(tmp_path):
    """--train_dir folders of one subfolder per class are listed directly (1.4 s for 200,000 files instead of
    datasets' 54 s cold; benchmarks/large_data.py): the same rows, order, labels and features as imagefolder."""
    from datasets import load_dataset

    from hf_transfer.data.sources import _class_folders

    images = iter(random_images(14, size=8))
    for split, classes in (("train", {"cat": 4, "dog": 3, "eel": 2}), ("validation", {"cat": 2, "dog": 1, "eel": 2})):
        for name, n in classes.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                next(images).save(tmp_path / split / name / f"{i * 7 % 10}.{'png' if i % 2 else 'JPG'}")
            (tmp_path / split / name / "notes.txt").write_text("not an image")
            (tmp_path / split / name / ".hidden.png").write_bytes(b"")
    files = {split: str(tmp_path / split / "**") for split in ("train", "validation")}
    listed = _class_folders(files)
    reference = load_dataset("imagefolder", data_files=files, cache_dir=str(tmp_path / "cache"))
    for split in files:
        mine, theirs = (d[split].cast_column("image", Image(decode=False)) for d in (listed, reference))
        assert mine.features == theirs.features and mine["label"] == theirs["label"]
        assert [c["path"] for c in mine["image"]] == [c["path"] for c in theirs["image"]]
    assert listed["train"].features["label"].names == ["cat", "dog", "eel"] and len(listed["train"]) == 9

    (tmp_path / "train" / "cat" / "kitten").mkdir()  # nested: datasets' depth rules decide the labels
    assert _class_folders(files) is None
    (tmp_path / "train" / "cat" / "kitten").rmdir()
    (tmp_path / "train" / "metadata.jsonl").write_text("{}")  # labels from a metadata file
    assert _class_folders(files) is None


def test_class_folders_given_relative_are_listed_with_paths_that_hold_from_any_folder(tmp_path, monkeypatch):
    """`--train_dir data/train` from the data's parent: the rows hold absolute paths, as datasets' imagefolder
    writes them, so the test report's files and anything read later do not depend on the folder a run started in."""
    from datasets import load_dataset

    from hf_transfer.data.sources import _class_folders

    class_folders(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    monkeypatch.chdir(tmp_path)
    files = {"train": "data/train/**"}
    mine = _class_folders(files)["train"].cast_column("image", Image(decode=False))
    theirs = load_dataset("imagefolder", data_files=files, cache_dir=str(tmp_path / "cache"))["train"]
    paths = [c["path"] for c in mine["image"]]
    assert paths == [c["path"] for c in theirs.cast_column("image", Image(decode=False))["image"]]
    assert paths[0] == str(tmp_path / "data" / "train" / "a" / "000.png")


# ---------------------------------------------------------------- no training batch BatchNorm cannot normalise


def digit_folders(root, classes: int = 4, images: int = 246) -> str:
    """Class folders of real digits (the first `classes` digits, `images` in all): with the default validation
    split, 221 training images, which a batch of 22 (a tenth: the data-fitted size) leaves one over."""
    train = digits_dataset()["train"]
    kept = [i for i, label in enumerate(train["label"]) if label < classes][:images]
    for i in kept:
        folder = root / "train" / str(train[i]["label"])
        folder.mkdir(parents=True, exist_ok=True)
        train[i]["image"].save(folder / f"{i}.png")
    return str(root / "train")


@pytest.fixture(scope="module")
def resnet_16px(tmp_path_factory):
    """A timm ResNet whose last stage is 1 x 1 at 16 px: a batch of one image cannot be normalised there."""
    from helpers import make_checkpoint

    return make_checkpoint("resnet", tmp_path_factory.mktemp("resnet-16px"), image_size=16, num_labels=4)


def training_batch_sizes(monkeypatch) -> list[int]:
    from hf_transfer.trainers.transfer_trainer import TransferTrainer

    sizes, prepare = [], TransferTrainer._prepare_inputs

    def recorded(self, inputs):
        if self.model.training:
            sizes.append(len(inputs["pixel_values"]))
        return prepare(self, inputs)

    monkeypatch.setattr(TransferTrainer, "_prepare_inputs", recorded)
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("accumulation, batch", [(1, 22), (2, 11)])
def test_a_last_training_batch_of_one_image_is_completed_and_the_epoch_keeps_its_steps(
        resnet_16px, tmp_path, monkeypatch, caplog, accumulation, batch):
    """The data-fitted batch (a tenth of 221 images: 22, or 11 per micro-batch with 2 accumulation steps) leaves one
    image over; torch refuses to normalise it in training at the 1 x 1 last stage ("Expected more than 1 value per
    channel"). The last batch is completed instead: every batch is whole, an epoch still has its 11 steps."""
    import run_finetune

    train_dir = digit_folders(tmp_path / "digits")
    sizes = training_batch_sizes(monkeypatch)
    with caplog.at_level(logging.INFO):
        results = run_finetune.main([
            "--model_name_or_path", resnet_16px, "--from_scratch", "--train_dir", train_dir, "--max_steps", "12",
            "--gradient_accumulation_steps", str(accumulation), "--output_dir", str(tmp_path / "run"),
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none"])
    # an epoch: ceil(221 / batch) batches, all whole (11 steps); then the first step of the next
    per_epoch = -(-221 // batch)
    assert results["train_samples"] == 221 and sizes == [batch] * (per_epoch + accumulation)
    assert results["epoch"] == pytest.approx(1 + accumulation / per_epoch)
    assert f"it is completed with {batch - 1} images drawn again" in caplog.text


@pytest.mark.slow
def test_the_batchnorm_statistics_never_run_a_batch_of_one_image(resnet_16px, tmp_path, monkeypatch):
    """The statistics (trainers/batchnorm.py) run the model in training mode over the training images in
    evaluation batches: 221 images in batches of 22 end on one image, which is joined to the batch before it."""
    import run_finetune
    from hf_transfer.trainers import transfer_trainer

    seen, recompute = [], transfer_trainer.recompute_statistics

    def recorded(model, batches, reduce=None):
        batches = list(batches)
        seen.append([len(b) for b in batches])
        return recompute(model, batches, reduce)

    monkeypatch.setattr(transfer_trainer, "recompute_statistics", recorded)
    run_finetune.main([
        "--model_name_or_path", resnet_16px, "--from_scratch", "--train_dir", digit_folders(tmp_path / "digits"),
        "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "22", "--output_dir", str(tmp_path / "run"), "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--report_to", "none"])
    assert seen and all(sizes == [22] * 9 + [23] for sizes in seen)


def test_batchnorm_batches_are_completed_or_joined_only_where_one_image_would_be_alone():
    from hf_transfer.trainers.batchnorm import completion, normalisable

    assert completion(221, 22) == 21 and completion(220, 22) == completion(222, 22) == 0
    assert completion(221, 22, processes=2) == 0  # accelerate completes every process's last batch itself
    assert completion(221, 22, processes=2, even_batches=False) == 21  # the last batch goes to one process whole
    assert completion(5, 1) == 0  # a batch size of 1 is refused before training (TransferTrainer)

    def sizes(*batches):
        return [len(b) for b in normalisable(torch.zeros(n, 1) for n in batches)]

    assert sizes(4, 4, 1) == [4, 5] and sizes(1, 4, 4) == [5, 4] and sizes(4, 4, 2) == [4, 4, 2]
    assert sizes(1, 1, 1, 1, 1) == [2, 3]  # an evaluation batch size of 1: pairs, the last one joined
    assert sum(sizes(*[1] * 7)) == 7


def test_a_batch_of_one_image_per_device_is_refused_for_a_batchnorm_model(resnet_16px, tmp_path, capsys):
    import run_finetune
    from hf_transfer.errors import run_cli

    code = run_cli(run_finetune.main, [
        "--model_name_or_path", resnet_16px, "--dataset_name", "digits", "--max_train_samples", "40",
        "--per_device_train_batch_size", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
        "--dataloader_num_workers", "0", "--report_to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the batch size per device is 1"), err
    assert not (tmp_path / "run" / "run_args.json").exists()  # refused before the run wrote anything


# ---------------------------------------------------------------- evaluation subsets and classes without training images


def class_folders(root, splits: dict[str, dict[str, int]], size: int = 8) -> dict[str, str]:
    """Image folders, one subfolder per class: split -> {class: images}; the folders each split has."""
    seed = 0
    for split, classes in splits.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, image in enumerate(random_images(n, size=size, seed=seed)):
                image.save(root / split / name / f"{i:03d}.png")
            seed += 1
    return {f"{split}_dir": str(root / split) for split in splits}


def test_max_eval_samples_keeps_every_class_of_a_class_sorted_folder_in_proportion(tmp_path):
    """Folder splits are listed class by class: the first 12 rows of validation or test are all 'a'. The subsets
    are stratified (as --max_train_samples is), seeded, and keep the split's own order."""
    counts = {"a": 20, "b": 10, "c": 10}
    folders = class_folders(tmp_path, {"train": counts, "validation": counts, "test": counts})
    subsets = {seed: load_image_data(**folders, max_eval_samples=12, seed=seed) for seed in (0, 0, 1)}
    for data in subsets.values():
        for split in (data.validation, data.test):
            assert np.bincount(split["label"]).tolist() == [6, 3, 3]
            assert split[ROW] == sorted(split[ROW])
    assert subsets[0].test[ROW] != load_image_data(**folders, max_eval_samples=12, seed=1).test[ROW]
    assert subsets[0].test[ROW] == load_image_data(**folders, max_eval_samples=12, seed=0).test[ROW]


def test_max_eval_samples_of_a_validation_split_carved_out_of_train_is_stratified(tmp_path):
    folders = class_folders(tmp_path, {"train": {"a": 50, "b": 50, "c": 50}})
    for seed in range(5):  # a plain first 9 of the carved split holds 3 of each in only 1 draw out of 5
        data = load_image_data(**folders, validation_split=0.2, max_eval_samples=9, seed=seed)
        assert np.bincount(data.validation["label"]).tolist() == [3, 3, 3]


def test_max_eval_samples_with_several_labels_per_image_keeps_every_label(tmp_path):
    """Rows sorted by their labels (the first 20 hold only 'a'); each image stratified by its rarest label; a class
    of one image and images without a label take part too."""
    labels = [["a"]] * 20 + [["a", "b"]] * 10 + [["c"]] * 10 + [["d"]] + [[]] * 5
    features = Features({"image": Image(), "labels": List(Value("string"))})
    split = Dataset.from_dict({"image": random_images(len(labels), size=8), "labels": labels}, features=features)
    data = load_image_data(save(DatasetDict(train=split, validation=split), tmp_path), max_eval_samples=20)
    kept = [tuple(data.label_names[i] for i in row) for row in data.validation["labels"]]
    assert len(kept) == 20 and {("a",), ("a", "b"), ("c",)} <= set(kept)
    assert data.validation[ROW] == sorted(data.validation[ROW])


@pytest.mark.parametrize("layout", ["train_dir", "dataset_name"])
def test_a_class_folder_only_the_test_split_has_is_refused_naming_it(tmp_path, layout):
    folders = class_folders(tmp_path, {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2, "Dog": 2}})
    source = folders if layout == "train_dir" else {"dataset_name": str(tmp_path), "cache_dir": str(tmp_path / "c")}
    with pytest.raises(UserError, match=r"^the test split has classes no training image has: Dog \(class folders "):
        load_image_data(**source)


def test_a_string_label_only_validation_has_is_refused_naming_it(tmp_path):
    features = Features({"image": Image(), "label": Value("string")})
    ds = DatasetDict(train=Dataset.from_dict({"image": random_images(6), "label": ["cat", "dog"] * 3}, features=features),
                     validation=Dataset.from_dict({"image": random_images(2), "label": ["cat", "cta"]},
                                                  features=features))
    with pytest.raises(UserError, match=r"^the validation split has classes no training image has: cta \(labels "):
        load_image_data(save(ds, tmp_path))


def test_splits_that_name_their_classes_differently_are_refused(tmp_path):
    """A save_to_disk folder keeps each split's own features: label 1 would be 'dog' in train and 'cat' in test."""
    def split(names):
        features = Features({"image": Image(), "label": ClassLabel(names=names)})
        return Dataset.from_dict({"image": random_images(4), "label": [0, 1] * 2}, features=features)

    ds = DatasetDict(train=split(["cat", "dog"]), test=split(["dog", "cat"]))
    with pytest.raises(UserError, match=r"^the test split names its classes dog, cat, the train split cat, dog"):
        load_image_data(save(ds, tmp_path))


def test_a_declared_class_without_training_images_is_named_in_a_warning(tmp_path, caplog):
    """A ClassLabel names the data set's classes: one the training split lacks is a fact about the data, not a
    mistake; the model cannot learn it, and the run says which."""
    features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog", "eel"])})
    ds = DatasetDict(train=Dataset.from_dict({"image": random_images(6), "label": [0, 1] * 3}, features=features),
                     test=Dataset.from_dict({"image": random_images(3), "label": [0, 1, 2]}, features=features))
    with caplog.at_level(logging.WARNING):
        data = load_image_data(save(ds, tmp_path), validation_split=0.34)
    assert data.label_names == ["cat", "dog", "eel"]
    assert "1 class(es) have no training image: eel; the model cannot learn them (0 validation image(s) of them, " \
           "1 test image(s) of them)" in caplog.text


@pytest.mark.parametrize("flag", ["--validation_split", "--train_val_split"])
def test_validation_split_on_a_data_set_with_its_own_validation_split_is_refused(tiny_resnet, tmp_path, capsys, flag):
    """The flag carves validation out of train only when there is none: it would be silently ignored."""
    from hf_transfer.errors import run_cli
    from run_finetune import main

    data = save(colour_dataset(n_per_class=4, splits=("train", "validation")), tmp_path)
    out = tmp_path / "run"
    assert run_cli(main, ["--model_name_or_path", tiny_resnet, "--dataset_name", data, flag, "0.3", "--output_dir",
                          str(out), "--max_steps", "2", "--report_to", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --validation_split: ") and "has a validation split of its own (12 images)" in \
        err[-1], err[-2:]
    assert not out.exists()
