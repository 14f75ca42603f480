"""Presets, checkpoint loading (timm and transformers-native), the head and the input size."""

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_transfer.errors import UserError
from hf_transfer.models.loading import checkpoint_family, load_model, model_family, set_input_size
from hf_transfer.models.presets import ALIASES, PRESETS, resolve_source
from hf_transfer.models.structure import classifier_head

NAMES = ["cat", "dog", "frog"]


def test_presets_resolve_to_checkpoints():
    assert resolve_source("resnet50", None) == "timm/resnet50.a1_in1k"
    assert resolve_source("resnet50-tv", None) == "timm/resnet50.tv_in1k"
    assert resolve_source("vit", None) == resolve_source("vit-base", None) == "google/vit-base-patch16-224-in21k"
    assert resolve_source(None, None) == PRESETS["resnet50"].checkpoint
    assert resolve_source(None, "some/path") == "some/path"
    with pytest.raises(UserError, match="not both"):
        resolve_source("resnet18", "some/path")
    assert {"resnet18", "resnet34", "resnet50", "vit-base", "vit-small"} <= set(PRESETS) | set(ALIASES)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError, match="unknown --model 'resnet51'; choose one of: resnet18, resnet34, resnet50"):
        resolve_source("resnet51", None)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_resnet", "tiny_hf_resnet"])
def test_new_labels_get_a_new_head(request, fixture):
    path = request.getfixturevalue(fixture)
    loaded = load_model(path, ["a", "b", "c", "d"])
    assert loaded.model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert loaded.head_reset
    logits = loaded.model(pixel_values=torch.zeros(1, 3, *loaded.spec.size)).logits
    assert logits.shape == (1, 4)


def test_same_number_of_labels_with_other_names_resets_the_head(tiny_vit):
    original = AutoModelForImageClassification.from_pretrained(tiny_vit)
    kept = load_model(tiny_vit, ["old0", "old1", "old2"])  # the checkpoint's own labels: head kept
    renamed = load_model(tiny_vit, NAMES)
    assert not kept.head_reset and renamed.head_reset
    assert torch.equal(classifier_head(kept.model).weight, classifier_head(original).weight)
    assert not torch.equal(classifier_head(renamed.model).weight, classifier_head(original).weight)
    # the backbone is the checkpoint's either way
    ours, theirs = renamed.model.state_dict(), original.state_dict()
    backbone = [key for key in theirs if not key.startswith("classifier")]
    assert len(backbone) > 10 and all(torch.equal(ours[key], theirs[key]) for key in backbone)


def test_spec_is_read_from_the_checkpoint(tiny_vit, tiny_resnet):
    vit = load_model(tiny_vit, NAMES)
    assert vit.spec.mean == (0.5, 0.5, 0.5) and vit.spec.size == (32, 32) and vit.family == "vit"
    resnet = load_model(tiny_resnet, NAMES)  # timm: from pretrained_cfg
    assert resnet.spec.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.spec.interpolation == "bicubic"
    assert resnet.family == "cnn"


def test_preset_from_scratch_needs_no_download():
    loaded = load_model(PRESETS["resnet18"].checkpoint, NAMES, from_scratch=True)
    assert type(loaded.model).__name__ == "TimmWrapperForImageClassification"
    assert loaded.spec.size == (224, 224) and loaded.family == "cnn"
    assert loaded.spec.mean == pytest.approx((0.485, 0.456, 0.406)) and loaded.spec.interpolation == "bicubic"


def test_vit_base_from_scratch_is_the_in21k_architecture():
    loaded = load_model(PRESETS["vit-base"].checkpoint, NAMES, from_scratch=True)
    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (768, 12, 16, 224)
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.family == "vit"


def test_unreachable_checkpoint_says_how_to_run_offline():
    with pytest.raises(UserError, match="could not load model config 'someone/no-such-model'.*HF_HUB_OFFLINE=1"):
        load_model("someone/no-such-model", NAMES)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_resnet", "tiny_hf_resnet"])
def test_image_size_changes_the_input_size(request, fixture, tmp_path):
    loaded = load_model(request.getfixturevalue(fixture), NAMES, image_size=48)
    assert loaded.spec.size == (48, 48)
    model = loaded.model.eval()
    x = torch.randn(2, 3, 48, 48)
    logits = model(pixel_values=x).logits
    assert logits.shape == (2, 3)
    model.save_pretrained(tmp_path)  # the saved config rebuilds the model at the new size
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(pixel_values=x).logits, logits)


def test_vit_position_embeddings_are_resampled_not_reset(tiny_vit):
    original = load_model(tiny_vit, NAMES).model
    resized = set_input_size(load_model(tiny_vit, NAMES).model, 64)
    old = original.vit.embeddings.position_embeddings
    new = resized.vit.embeddings.position_embeddings
    assert new.shape[1] == 1 + (64 // 8) ** 2
    assert torch.equal(new[:, 0], old[:, 0])  # the class token's embedding is kept


def test_image_size_must_fit_the_patches(tiny_vit):
    with pytest.raises(UserError, match="--image_size 50 is not a multiple of the model's patch size 8"):
        load_model(tiny_vit, NAMES, image_size=50)


def test_family():
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    assert model_family(ResNetForImageClassification(ResNetConfig(depths=[1], hidden_sizes=[8]))) == "cnn"
    assert model_family(ViTForImageClassification(ViTConfig(num_hidden_layers=1, hidden_size=8,
                                                            num_attention_heads=1, intermediate_size=8))) == "vit"


def test_family_from_the_checkpoint_alone_and_of_every_preset(tiny_vit, tiny_resnet, tiny_hf_resnet):
    """The family picks the recipe before the flags are parsed: from the config, without weights."""
    assert checkpoint_family(tiny_vit) == "vit"
    assert checkpoint_family(tiny_resnet) == checkpoint_family(tiny_hf_resnet) == "cnn"
    for name, preset in PRESETS.items():  # what the preset table says is what the architecture is
        assert checkpoint_family(preset.checkpoint, from_scratch=True) == preset.family, name


def test_a_compiled_model_compiles_once(tiny_resnet, cifar_like, tmp_path, monkeypatch):
    """The Trainer's loss used to find out the task at the first step and write it into the config, which
    torch.compile guards on: every run compiled twice. `load_model` says it (single-label) up front."""
    from hf_transfer.data.dataset import load_image_data
    from hf_transfer.data.samples import attach_transforms
    from hf_transfer.run.assembly import trainer_kwargs
    from hf_transfer.trainers.transfer_config import TransferConfig
    from hf_transfer.trainers.transfer_trainer import TransferTrainer

    data = load_image_data(cifar_like)
    attach_transforms(data, "none")
    loaded = load_model(tiny_resnet, data.label_names)
    assert loaded.model.config.problem_type == "single_label_classification"
    args = TransferConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=5,  # 48 images: full batches
                          torch_compile=True, torch_compile_backend="eager", use_cpu=True, dataloader_num_workers=0,
                          report_to="none", eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    try:
        TransferTrainer(**trainer_kwargs(args, data, loaded)).train()  # a recompilation raises
    finally:
        torch._dynamo.reset()
