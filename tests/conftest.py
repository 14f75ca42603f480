"""Test setup: offline, CPU, hermetic caches, and shared tiny checkpoints and data sets."""

import os
import tempfile

# Before transformers/datasets are imported: an accidental download fails at once instead of
# hanging, and caches go to a throw-away directory.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# The canaries (tests/test_compat.py) judge the installed versions; the line a command prints about them would only
# change the output the tests read.
os.environ["HF_TRANSFER_NO_VERSION_WARNING"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import colour_dataset, make_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    network = os.environ.get("HF_TRANSFER_NETWORK_TESTS") == "1"
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
        if "network" in item.keywords and not network:
            item.add_marker(pytest.mark.skip(reason="needs the Hub (set HF_TRANSFER_NETWORK_TESTS=1)"))


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    return make_checkpoint("vit", tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory):
    return make_checkpoint("resnet", tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="session")
def tiny_hf_resnet(tmp_path_factory):
    return make_checkpoint("hf-resnet", tmp_path_factory.mktemp("tiny-hf-resnet"))


@pytest.fixture(scope="session")
def cifar_like(tmp_path_factory):
    """A local data set with CIFAR-10's schema (`img`, `label` ClassLabel), laid out like a Hub repo (parquet)."""
    root = tmp_path_factory.mktemp("cifar-like")
    ds = colour_dataset(n_per_class=16)
    (root / "plain_text").mkdir()
    for split, part in ds.items():
        part.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return str(root)


def quick_flags():
    return ["--dataloader_num_workers", "0", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
            "--disable_tqdm", "true", "--logging_steps", "5", "--min_train_steps", "0", "--min_seen_images", "0",
            "--report_to", "none"]


@pytest.fixture
def quick_args():
    """Flags that keep an end-to-end run to a few seconds on 2 CPU cores."""
    return quick_flags()


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small ResNet trained from scratch by run_finetune on the real digits (8x8 px, shown at 32 px)."""
    import run_finetune

    checkpoint = make_checkpoint("resnet", tmp_path_factory.mktemp("digits-arch"))
    out = tmp_path_factory.mktemp("digits-run")
    results = run_finetune.main([
        "--model_name_or_path", checkpoint, "--from_scratch", "--dataset_name", "digits", "--output_dir", str(out),
        "--overwrite_output_dir", "--num_train_epochs", "5", "--learning_rate", "0.05",
        "--per_device_train_batch_size", "32", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        "--seed", "0",
    ])
    return out, results


@pytest.fixture(scope="session")
def cifar_teacher(tiny_vit, cifar_like, tmp_path_factory):
    """A tiny ViT fine-tuned by run_finetune on the CIFAR-schema set (mean/std 0.5, 32 px)."""
    import run_finetune

    out = tmp_path_factory.mktemp("cifar-teacher")
    run_finetune.main(["--model_name_or_path", tiny_vit, "--dataset_name", cifar_like, "--output_dir", str(out),
                       "--overwrite_output_dir", "--num_train_epochs", "2", *quick_flags()])
    return str(out)
