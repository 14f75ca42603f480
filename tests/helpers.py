"""Tiny checkpoints and data sets the tests build offline, in the formats users bring."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image


def make_checkpoint(kind: str, directory: Path, image_size: int = 32, num_labels: int = 3, seed: int = 0,
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct: float | None = None) -> str:
    """Save a tiny random checkpoint: 'resnet' or 'convnext' (timm, via TimmWrapper; the ConvNeXt has no
    BatchNorm), 'vit' (transformers-native ViT) or 'hf-resnet' (transformers-native ResNet; with `crop_pct`,
    microsoft/resnet-50's processor: the shorter edge to size / crop_pct, the centre cropped). Loaded like any
    Hub checkpoint."""
    import timm
    import torch
    from transformers import (
        AutoModelForImageClassification,
        ConvNextImageProcessor,
        ResNetConfig,
        TimmWrapperConfig,
        ViTConfig,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    labels = {"num_labels": num_labels, "id2label": {i: f"old{i}" for i in range(num_labels)},
              "label2id": {f"old{i}": i for i in range(num_labels)}}
    processor = None
    if kind in ("resnet", "convnext"):
        architecture = f"test_{kind}"
        pretrained_cfg = timm.get_pretrained_cfg(architecture).to_dict()
        pretrained_cfg.update(input_size=[3, image_size, image_size], mean=list(mean), std=list(std),
                              interpolation="bicubic")
        config = TimmWrapperConfig(architecture=architecture, pretrained_cfg=pretrained_cfg, **labels)
    elif kind == "vit":
        config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=96, **labels)
        processor = ViTImageProcessor(size={"height": image_size, "width": image_size},
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    elif kind == "hf-resnet":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                              downsample_in_first_stage=False, **labels)
        processor = ViTImageProcessor(size={"height": image_size, "width": image_size},
                                      image_mean=list(mean), image_std=list(std))
        if crop_pct is not None:
            processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=crop_pct, resample=3,
                                               image_mean=list(mean), image_std=list(std))
    else:
        raise ValueError(kind)
    model = AutoModelForImageClassification.from_config(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    return str(directory)


def random_images(n: int, size: int = 32, mode: str = "RGB", seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arrays = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    return [PIL.Image.fromarray(a[..., 0] if channels == 1 else a, mode=None) for a in arrays]


def colour_dataset(n_per_class: int = 12, size: int = 32, names=("red", "green", "blue"), image_key: str = "img",
                   label_key: str = "label", seed: int = 0, mode: str = "RGB", splits=("train", "test")) -> DatasetDict:
    """A learnable toy set: each class is noise around one dominant colour channel (CIFAR-10's schema by default)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        images, labels = [], []
        for label in range(len(names)):
            for _ in range(n_per_class):
                array = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                array[..., label % 3] += 150
                image = PIL.Image.fromarray(array)
                if mode != "RGB":
                    image = image.convert(mode)
                images.append(image)
                labels.append(label)
        features = Features({image_key: Image(), label_key: ClassLabel(names=list(names))})
        out[split] = Dataset.from_dict({image_key: images, label_key: labels}, features=features)
    return DatasetDict(out)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class FakeHub:
    """Records what would reach the Hub (the client replaced at its API boundary, `HfApi`): repos and
    branches created, and each upload's files (patterns applied), folder in the repo, revision and card."""

    def __init__(self, monkeypatch, fail_upload=False, whoami_error=None):
        import fnmatch
        from concurrent.futures import Future

        from huggingface_hub import HfApi, RepoUrl

        self.repos, self.uploaded, self.uploads, self.branches = [], [], [], []
        hub = self

        def whoami(self, token=None, **kwargs):
            if whoami_error:
                raise whoami_error
            return {"name": "me"}

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            if not any(r["repo_id"] == repo_id for r in hub.repos):
                hub.repos.append({"repo_id": repo_id, "private": private})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
            hub.branches.append((repo_id, branch))

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, path_in_repo=None,
                          revision=None, run_as_future=False, **kwargs):
            if fail_upload:
                raise ConnectionError("Hub unreachable")
            root = Path(folder_path)
            files = []
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root).as_posix()

                def matches(patterns, name=relative):
                    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.split("/")[0], p) for p in patterns or [])

                if path.is_file() and not matches(ignore_patterns) and (allow_patterns is None or matches(allow_patterns)):
                    files.append(f"{path_in_repo}/{relative}" if path_in_repo else relative)
            card = (root / "README.md").read_text() if "README.md" in files else None
            hub.uploads.append({"repo_id": repo_id, "files": files, "revision": revision, "card": card})
            hub.uploaded.extend(files)
            if run_as_future:
                done = Future()
                done.set_result(None)
                return done
            return None

        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")


TEXTURES = ("checkerboard", "horizontal", "noise", "vertical")


def texture_image(kind: str, width: int, height: int, rng) -> PIL.Image.Image:
    """Stripes or a checkerboard 16 cycles across, or flat noise: visible at 64 px, gone at 16 px."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 1)
    horizontal = np.floor(y / height * 32 + phase) % 2
    vertical = np.floor(x / width * 32 + phase) % 2
    pattern = {"horizontal": horizontal, "vertical": vertical, "checkerboard": (horizontal + vertical) % 2,
               "noise": np.full((height, width), 0.5)}[kind]
    grey = 60 + 130 * pattern + rng.normal(0, 12, size=(height, width))
    return PIL.Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


def texture_folders(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Image folders (one subfolder per class) of textures 56-120 px on each side, any aspect ratio."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for kind in TEXTURES:
            folder = Path(root) / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(v) for v in rng.integers(56, 121, size=2))
                texture_image(kind, width, height, rng).save(folder / f"{kind}-{i}.png")
    return Path(root)


def unlabeled_folder(root: Path, n: int = 24, seed: int = 1, size: int = 32) -> Path:
    """Images without labels as users have them: nested folders whose names mean nothing, mixed sizes, a text file
    and one broken image among them (colour images of `colour_dataset`'s kind, another seed)."""
    images = colour_dataset(n_per_class=n // 3 + 1, size=size, seed=seed, splits=("train",))["train"]["img"][:n]
    root = Path(root)
    for i, image in enumerate(images):
        folder = root / ["", "a", "a/b", "c"][i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        image.resize((size + 4 * (i % 3), size)).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    (root / "notes.txt").write_text("not an image")
    (root / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    return root


def fitted(parsed, num_train: int, task=None):
    """`parsed` (a RunConfig) with the defaults `fit_to_data` fits to `num_train` training images, as a run fits them."""
    from hf_transfer.config.fitting import fit_to_data

    return parsed.fitted_to({fit.flag: fit.value for fit in fit_to_data(parsed.training, num_train, parsed.given, task)})


def distil(student, teacher, labels, alpha, temperature, labelled_count=None, image_count=None, label_smoothing=0.0,
           class_weights=None, multi_label=False, loss="kl"):
    """(loss, label term, distillation term) of the distillation objective `loss` (tasks/objectives.py), called as
    the trainer calls it for one batch (`labelled_count`, `image_count`: the step's counts; None: the batch's)."""
    from types import SimpleNamespace

    from hf_transfer.tasks.classification import MultiLabel, SingleLabel
    from hf_transfer.tasks.objectives import DISTILLATION_LOSSES

    task = (MultiLabel if multi_label else SingleLabel)(student.shape[-1])
    objective = DISTILLATION_LOSSES[loss](task, alpha, temperature, label_smoothing, class_weights)
    counts = SimpleNamespace(labelled=labelled_count, images=image_count)
    total, terms = objective(student, labels, counts, teacher)
    return total, terms["ce_loss"], terms["kd_loss"]
