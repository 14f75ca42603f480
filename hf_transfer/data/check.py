"""The data check: what is wrong with a data set's splits before a model trains on them (docs/data-check.md).

One pass over each split's decoded pixels (`scan_split`; a split the run decodes once anyway is read from that
tensor, nothing decoded twice) records per image: its size, a SHA-1 of its decoded RGB pixels, a 64-bit
perceptual hash (imagehash's pHash) and an 8x8 grey thumbnail. `check` turns the scans into findings:

- unreadable: an image that does not decode;
- hidden_file: a file or folder under an image folder whose name starts with "." or "__" (the loader skips it);
- too_small: images smaller than the model's input (they are upscaled);
- few_images / imbalance / class_in_one_split: class counts of the training split and the others;
- exact_duplicate: the same pixels twice (within a split, or across splits: a leak);
- near_duplicate: an evaluation image that a training (or validation) image shows resized or re-encoded: pHashes
  at most NEAR_BITS apart, confirmed by thumbnails at most NEAR_PIXELS grey levels apart on average.

Exact duplicates are found by the decoded pixels, not the file bytes: the same picture saved again (another PNG
compressor, metadata stripped) has other bytes and the same pixels, and the pixels are decoded for the perceptual
hash anyway. The leak counts are evaluation images (validation, test) already seen by an earlier split (train, or
train and validation for test): `exact` by their pixels, `near` by their pHash and thumbnail only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import imagehash
import numpy as np
import PIL.Image

from .dataset import ROW
from .decoding import decode_rgb
from .sources import SKIPPED

FILE, PAGE = "data_check.json", "data_check.html"
NEAR_BITS = 10  # pHash bits (of 64) within which two images are candidates for a near-duplicate
NEAR_PIXELS = 3.0  # mean absolute difference of the 8x8 grey thumbnails (0..255) that confirms one
# 8x8: at 16x16 a small image and its re-encoded copy kept more of their resampling's differences (a 16 px digit and
# its 40 px JPEG: 2.6-4.1 grey levels apart at 16x16, 0.8-1.4 at 8x8), while different digits stayed >= 5.4 apart.
THUMB = 8
FEW_IMAGES = 10  # a class with fewer training images than this is reported
IMBALANCE = 10.0  # largest / smallest training class beyond which the imbalance is reported
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # set bits per byte (numpy < 2 too)
ORDER = ("train", "validation", "test")  # an image of a later split seen in an earlier one is a leak


@dataclass
class SplitScan:
    """What one pass over a split's images found, one entry per row (in the split's order)."""

    split: str
    rows: list[int]
    files: list[str | None]
    labels: list  # class ids (a list of them per image for several labels; -1: no label)
    sizes: np.ndarray  # (n, 2) width, height; 0 where unreadable
    digests: list[str | None]  # SHA-1 of the decoded RGB pixels and their shape; None where unreadable
    hashes: np.ndarray  # (n, 8) uint8: the 64-bit pHash, packed
    thumbs: np.ndarray  # (n, THUMB, THUMB) uint8 grey
    unreadable: dict[int, str] = field(default_factory=dict)  # index -> the decoder's error


def image_facts(pixels: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(pixel digest, packed pHash, grey thumbnail) of one HWC uint8 RGB image."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
    grey = PIL.Image.fromarray(pixels).convert("L")
    bits = imagehash.phash(grey).hash.ravel()
    thumb = np.asarray(grey.resize((THUMB, THUMB), PIL.Image.BILINEAR), dtype=np.uint8)
    return digest, np.packbits(bits), thumb


def scan_split(ds, image_column: str, label_column: str, split: str, decoded=None) -> SplitScan:
    """One pass over the split `ds` (its stored cells, decode=False); `decoded`: the split's pixels already decoded
    (data/samples.py `DecodedSplit`), read instead of the files."""
    raw = ds.with_format(None)
    n = len(raw)
    scan = SplitScan(split, [], [], [], np.zeros((n, 2), np.int64), [None] * n, np.zeros((n, 8), np.uint8),
                     np.zeros((n, THUMB, THUMB), np.uint8))
    raw = raw.select_columns([c for c in (image_column, label_column, ROW) if c in raw.column_names])
    for start in range(0, n, 1024):
        chunk = raw[start:start + 1024]
        for i, cell in enumerate(chunk[image_column], start):
            row = int(chunk[ROW][i - start]) if ROW in chunk else i
            scan.rows.append(row)
            scan.files.append(cell.get("path") if isinstance(cell, dict) else None)
            scan.labels.append(chunk[label_column][i - start] if label_column in chunk else -1)
            try:
                pixels = (decoded.images[decoded.position[row]].numpy() if decoded is not None
                          else decode_rgb(cell).permute(1, 2, 0).numpy())
            except Exception as exc:  # PIL raises many types; any of them means the file is unusable
                scan.unreadable[i] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                continue
            scan.sizes[i] = pixels.shape[1], pixels.shape[0]
            scan.digests[i], scan.hashes[i], scan.thumbs[i] = image_facts(pixels)
    return scan


def hidden_entries(folders) -> list[str]:
    """Files and folders under `folders` whose names the loader skips, each hidden folder once (not its files)."""
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in sorted(dirs + files):
                if name.startswith(SKIPPED):
                    found.append(os.path.join(root, name))
            dirs[:] = [d for d in dirs if not d.startswith(SKIPPED)]
    return sorted(found)


# ---------------------------------------------------------------- findings


def check(scans: dict[str, SplitScan], label_names: list[str], input_size: int | None = None,
          hidden: list[str] = (), near: bool = True) -> dict:
    """The data check's report (data_check.json's format, docs/data-check.md) from the splits' scans."""
    findings = []
    for scan in scans.values():
        findings += [_finding("unreadable", "error", f"{scan.split} image cannot be decoded: {error}",
                              [_image(scan, i)]) for i, error in scan.unreadable.items()]
    findings += [_finding("hidden_file", "warning", f"'{path}' is hidden: the loader skips it (delete it if it is "
                          "not meant to be there)", []) | {"path": path} for path in hidden]
    if input_size:
        findings += _too_small(scans, input_size)
    counts = {split: _class_counts(scan, len(label_names)) for split, scan in scans.items()}
    findings += _class_findings(counts, label_names)
    exact, exact_findings = _exact_duplicates(scans)
    near_leaks, near_findings = _near_duplicates(scans, exact) if near else (set(), [])
    return {"splits": {split: {"images": len(scan.rows),
                               "classes": {label_names[c]: int(n) for c, n in enumerate(counts[split])}}
                       for split, scan in scans.items()},
            "leaks": {"exact": len(exact), "near": len(near_leaks)},
            "findings": findings + exact_findings + near_findings}


def _finding(check_name: str, severity: str, message: str, images: list[dict]) -> dict:
    return {"check": check_name, "severity": severity, "message": message, "images": images}


def _image(scan: SplitScan, i: int) -> dict:
    return {"split": scan.split, "row": scan.rows[i], "file": scan.files[i]}


def _too_small(scans: dict[str, SplitScan], size: int) -> list[dict]:
    found = []
    for scan in scans.values():
        readable = scan.sizes.max(axis=1) > 0
        small = np.flatnonzero(readable & (scan.sizes.min(axis=1) < size))
        if small.size:
            w, h = scan.sizes[small[np.argmin(scan.sizes[small].prod(axis=1))]]
            found.append(_finding("too_small", "warning",
                                  f"{small.size} of {len(scan.rows)} {scan.split} images are smaller than the model's "
                                  f"input of {size} px (the smallest {w}x{h}): they are upscaled",
                                  [_image(scan, i) for i in small]))
    return found


def _class_counts(scan: SplitScan, num_labels: int) -> np.ndarray:
    ids = [v for label in scan.labels for v in (label if isinstance(label, list) else [label])]
    ids = np.asarray([v for v in ids if v is not None and 0 <= v < num_labels], dtype=np.int64)
    return np.bincount(ids, minlength=num_labels)


def _class_findings(counts: dict[str, np.ndarray], names: list[str]) -> list[dict]:
    found, train = [], counts["train"]
    for c in np.flatnonzero((train > 0) & (train < FEW_IMAGES)):
        found.append(_finding("few_images", "warning", f"class '{names[c]}' has {train[c]} training images (fewer "
                              f"than {FEW_IMAGES}): the model can hardly learn it", []) | {"class": names[c]})
    present = train[train > 0]
    if present.size > 1 and present.max() / present.min() > IMBALANCE:
        big, small = int(np.argmax(np.where(train > 0, train, -1))), int(np.argmin(np.where(train > 0, train, 1 << 62)))
        found.append(_finding("imbalance", "warning", f"the training classes are imbalanced: '{names[big]}' has "
                              f"{train[big]} images, '{names[small]}' {train[small]} ({train[big] / train[small]:.0f}x; "
                              "consider --class_weights auto)", []))
    if len(counts) > 1:
        for c, name in enumerate(names):
            holding = [split for split, n in counts.items() if n[c] > 0]
            if len(holding) == 1:
                found.append(_finding("class_in_one_split", "warning", f"class '{name}' has images in the "
                                      f"{holding[0]} split only ({counts[holding[0]][c]})", []) | {"class": name})
    return found


def _earlier(split: str, scans: dict[str, SplitScan]) -> list[str]:
    return [s for s in ORDER[:ORDER.index(split)] if s in scans] if split in ORDER else []


def _exact_duplicates(scans: dict[str, SplitScan]) -> tuple[set[tuple[str, int]], list[dict]]:
    """Groups of images with the same pixels, and the evaluation images (split, index) among them that an earlier
    split holds (the exact leaks)."""
    groups: dict[str, list[tuple[SplitScan, int]]] = {}
    for scan in scans.values():
        for i, digest in enumerate(scan.digests):
            if digest is not None:
                groups.setdefault(digest, []).append((scan, i))
    leaks, found = set(), []
    for members in groups.values():
        if len(members) < 2:
            continue
        splits = [scan.split for scan, _ in members]
        for scan, i in members:
            if any(s in splits for s in _earlier(scan.split, scans)):
                leaks.add((scan.split, i))
        across = len(set(splits)) > 1
        where = " and ".join(f"{s} (row {scan.rows[i]})" for (scan, i), s in zip(members[:4], splits))
        labels = {str(scan.labels[i]) for scan, i in members}
        message = (f"the same image in {where}{' and others' if len(members) > 4 else ''}"
                   + (": an evaluation image the model trains on (a leak)" if across else "")
                   + ("; with different labels" if len(labels) > 1 else ""))
        found.append(_finding("exact_duplicate", "error" if across or len(labels) > 1 else "warning", message,
                              [_image(scan, i) for scan, i in members]))
    return leaks, found


def _near_duplicates(scans: dict[str, SplitScan], exact: set) -> tuple[set[tuple[str, int]], list[dict]]:
    """Evaluation images that an earlier split shows resized or re-encoded (not pixel for pixel: those are exact),
    each with its nearest such image."""
    leaks, found = set(), []
    for split in ORDER[1:]:
        if split not in scans:
            continue
        scan = scans[split]
        for other in (scans[s] for s in _earlier(split, scans)):
            for i, j, bits, pixels in _near_pairs(scan, other):
                if (split, i) in exact or (split, i) in leaks:
                    continue
                leaks.add((split, i))
                found.append(_finding("near_duplicate", "warning",
                                      f"{split} row {scan.rows[i]} is nearly the same image as {other.split} row "
                                      f"{other.rows[j]} (pHash {bits} bits apart, {pixels:.1f} grey levels on "
                                      "average): a leak", [_image(other, j), _image(scan, i)])
                             | {"distance": int(bits), "pixel_difference": round(float(pixels), 2)})
    return leaks, found


def _near_pairs(scan: SplitScan, other: SplitScan, chunk: int = 512):
    """(index in scan, index in other, pHash bits, thumbnail difference) of each image of `scan` and its closest
    confirmed match in `other`, compared a chunk of `scan` at a time (memory: chunk x len(other) bytes)."""
    ok_a = np.array([d is not None for d in scan.digests])
    ok_b = np.array([d is not None for d in other.digests])
    if not ok_a.any() or not ok_b.any():
        return
    b_index = np.flatnonzero(ok_b)
    b_hashes, b_thumbs = other.hashes[b_index], other.thumbs[b_index].astype(np.int16)
    for start in range(0, len(scan.rows), chunk):
        a_index = np.flatnonzero(ok_a[start:start + chunk]) + start
        bits = POPCOUNT[scan.hashes[a_index][:, None, :] ^ b_hashes[None, :, :]].sum(axis=-1, dtype=np.int64)
        candidates = {}
        for a, k in zip(*np.nonzero(bits <= NEAR_BITS)):
            i = int(a_index[a])
            pixels = float(np.abs(scan.thumbs[i].astype(np.int16) - b_thumbs[k]).mean())
            if pixels <= NEAR_PIXELS and (i not in candidates or pixels < candidates[i][2]):
                candidates[i] = (int(b_index[k]), int(bits[a, k]), pixels)
        for i, (j, distance, pixels) in sorted(candidates.items()):
            yield i, j, distance, pixels


# ---------------------------------------------------------------- a loaded data set, checked and written


def check_image_data(data, input_size: int | None = None, folders=(), decoded: dict | None = None,
                     near: bool = True) -> dict:
    """The report of `data` (an `ImageData`): its splits scanned (`decoded`: split -> its pixels decoded once),
    `folders` searched for hidden files."""
    scans = {split: scan_split(ds, data.image_column, data.label_column, split, (decoded or {}).get(split))
             for split, ds in (("train", data.train), ("validation", data.validation), ("test", data.test))
             if ds is not None}
    return check(scans, data.label_names, input_size, hidden_entries(folders), near)


def local_folders(flags) -> list[str]:
    """The folders the data flags name (image folders, or a local data set's folder): where hidden files hide."""
    named = [flags.train_dir, flags.validation_dir, flags.test_dir, flags.dataset_name]
    return [folder for folder in named if folder and os.path.isdir(folder)]


def leak_results(report: dict) -> dict[str, int]:
    """The leak counts as the run's results name them (all_results.json)."""
    return {"data_leaks_exact": report["leaks"]["exact"], "data_leaks_near": report["leaks"]["near"]}


def summary(report: dict) -> list[tuple[str, str]]:
    """(severity, line) per finding, then the leak counts: what a run logs."""
    lines = [(f["severity"], f"data check: {f['check']}: {f['message']}") for f in report["findings"]]
    leaks = report["leaks"]
    lines.append(("error" if leaks["exact"] + leaks["near"] else "info",
                  f"data check: {leaks['exact']} exact and {leaks['near']} near leaks (evaluation images already in "
                  f"an earlier split); {len(report['findings'])} finding(s)"))
    return lines


def write_report(report: dict, output_dir, data) -> tuple[str, str]:
    """data_check.json and data_check.html in `output_dir`; the page's pictures read from `data`'s splits."""
    import json

    from .check_page import write_page

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FILE)
    with open(path, "w") as file:
        json.dump(report, file, indent=1)
    page = write_page(report, os.path.join(output_dir, PAGE), _Pictures(data))
    return path, str(page)


class _Pictures:
    """An image a finding names, read again from its split by row (files, or bytes in the data set)."""

    def __init__(self, data):
        self.data, self.index = data, {}

    def __call__(self, image: dict) -> PIL.Image.Image | None:
        split = getattr(self.data, image["split"], None)
        if split is None:
            return None
        raw = split.with_format(None)
        if image["split"] not in self.index:
            self.index[image["split"]] = {int(r): i for i, r in enumerate(raw[ROW])} if ROW in raw.column_names else {}
        position = self.index[image["split"]].get(image["row"], image["row"])
        try:
            return PIL.Image.fromarray(decode_rgb(raw[position][self.data.image_column]).permute(1, 2, 0).numpy())
        except Exception:  # an unreadable image: the page says so
            return None
