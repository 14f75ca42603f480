"""Near-duplicate detection, measured: perceptual hashes against a model's embeddings, on the faulty digits
(tests/faulty_data.py: 30 test images copied into train, 10 of them resized to 40 px and re-encoded as JPEG), and
the data check's cost at the start of a run on the built-in digits (1,797 images).

    python benchmarks/data_check.py benchmarks/data-check-cpu-2core.json

For each method: how many of the 10 re-encoded leaks it finds, how many other train/test pairs it takes for one
(false positives: a pair flagged that is no leak), and its cost in seconds per 1,000 images (hashing or embedding,
plus the search). Embeddings are a ResNet-18's pooled features (timm), nearest train image by cosine similarity,
at the threshold that admits all 10 leaks; no pretrained weights can be downloaded here, so the figures are for
random weights (what a --from_scratch run has) and for the same network trained for 2 epochs on the faulty train
split (a stand-in for a model that knows the images).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from faulty_data import faulty_digits  # noqa: E402

from hf_transfer.data import check as data_check  # noqa: E402
from hf_transfer.data.dataset import load_image_data  # noqa: E402
from hf_transfer.data.samples import attach_transforms  # noqa: E402

SEEDS = (0, 1, 2)


def truth(faulty, scans):
    index = {split: {f: i for i, f in enumerate(scans[split].files)} for split in ("train", "test")}
    near = {(index["train"][leak.train_file], index["test"][leak.test_file]) for leak in faulty.leaks
            if leak.kind == "near"}
    exact = {(index["train"][leak.train_file], index["test"][leak.test_file]) for leak in faulty.leaks
             if leak.kind == "exact"}
    return near, exact


def phash_methods(faulty, data) -> dict:
    start = time.perf_counter()
    scans = {split: data_check.scan_split(getattr(data, split), "image", "label", split) for split in ("train", "test")}
    scanned = time.perf_counter() - start
    images = sum(len(s.rows) for s in scans.values())
    near, exact = truth(faulty, scans)
    train, test = scans["train"], scans["test"]
    start = time.perf_counter()
    confirmed = {(j, i) for i, j, _, _ in data_check._near_pairs(test, train)}
    searched = time.perf_counter() - start
    bits = np.bitwise_count(train.hashes[:, None, :] ^ test.hashes[None, :, :]).sum(axis=-1)
    leak_bits = [int(bits[p]) for p in near]
    clean = np.ones_like(bits, dtype=bool)
    for pair in near | exact:
        clean[pair] = False
    alone = {f"at most {t} bits": {"found": sum(b <= t for b in leak_bits), "false_positives": int((bits[clean] <= t).sum())}
             for t in (0, 2, 4, data_check.NEAR_BITS)}
    return {"images": images, "phash_bits_of_the_near_leaks": sorted(leak_bits),
            "phash_bits_closest_clean_pair": int(bits[clean].min()),
            "phash_alone": alone,
            "phash_confirmed_by_thumbnail": {
                "found": len(confirmed & near), "false_positives": len(confirmed - near - exact),
                "seconds_per_1000_images": round((scanned + searched) / images * 1000, 3),
                "of_which_search": round(searched / images * 1000, 4)}}


def embeddings(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        features = [model.forward_head(model.forward_features(images[i:i + batch]), pre_logits=True)
                    for i in range(0, len(images), batch)]
    return torch.nn.functional.normalize(torch.cat(features), dim=1)


def as_tensor(ds) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_transfer.data.decoding import decode_rgb

    raw = ds.with_format(None)
    pixels = [torch.nn.functional.interpolate(decode_rgb(c)[None].float(), size=32, mode="bilinear")[0]
              for c in raw["image"]]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (torch.stack(pixels) / 255 - mean) / std, torch.tensor(raw["label"])


def embedding_method(faulty, data, trained: bool) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    scans = {split: data_check.scan_split(getattr(data, split), "image", "label", split) for split in ("train", "test")}
    near, exact = truth(faulty, scans)
    (train_x, train_y), (test_x, _) = as_tensor(data.train), as_tensor(data.test)
    if trained:
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(2):
            for batch in torch.randperm(len(train_x)).split(64):
                loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    start = time.perf_counter()
    a, b = embeddings(model, train_x), embeddings(model, test_x)
    similarity = a @ b.T  # (train, test) cosine
    nearest = similarity.argmax(dim=0)
    seconds = time.perf_counter() - start
    threshold = min(float(similarity[p]) for p in near)  # the loosest that admits every re-encoded leak
    clean = torch.ones_like(similarity, dtype=torch.bool)
    for pair in near | exact:
        clean[pair] = False
    return {"found_as_nearest": sum(int(nearest[j]) == i for i, j in near),
            "similarity_of_the_near_leaks_min": round(threshold, 4),
            "false_positives_at_that_similarity": int((similarity[clean] >= threshold).sum()),
            "seconds_per_1000_images": round(seconds / (len(train_x) + len(test_x)) * 1000, 3)}


def run_overhead() -> dict:
    """The check as a run makes it on the built-in digits: pixels read from the splits decoded once."""
    data = load_image_data(dataset_name="digits", seed=42)
    attach_transforms(data, "none", 42)
    start = time.perf_counter()
    report = data_check.check_image_data(data, 16, decoded=data.decoded)
    seconds = time.perf_counter() - start
    return {"images": sum(s["images"] for s in report["splits"].values()), "seconds": round(seconds, 3),
            "decoded_once": sorted(data.decoded), "leaks": report["leaks"]}


def main(output: str) -> None:
    torch.set_num_threads(2)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "near_bits": data_check.NEAR_BITS, "near_pixels": data_check.NEAR_PIXELS, "seeds": {}}
    for seed in SEEDS:
        faulty = faulty_digits(Path(tempfile.mkdtemp(prefix="faulty-")), seed=seed)
        data = load_image_data(train_dir=faulty.train, validation_dir=faulty.validation, test_dir=faulty.test)
        results["seeds"][seed] = {**phash_methods(faulty, data),
                                  "embeddings_random_resnet18": embedding_method(faulty, data, trained=False)}
        if seed == SEEDS[0]:
            results["seeds"][seed]["embeddings_trained_resnet18"] = embedding_method(faulty, data, trained=True)
        print(json.dumps(results["seeds"][seed]), flush=True)
    results["run_overhead_digits"] = run_overhead()
    Path(output).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["run_overhead_digits"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/data-check-cpu-2core.json")
