import json

import numpy as np
import pytest

from hf_transfer.tasks.metrics import classification_metrics, write_test_report


def one_hot_logits(predictions, num_labels):
    logits = np.zeros((len(predictions), num_labels))
    logits[np.arange(len(predictions)), predictions] = 1.0
    return logits


def test_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 1, 0])
    m = classification_metrics(one_hot_logits(predictions, 3), labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: p=2/3 r=2/3; class 1: p=2/3 r=1; class 2: p=0 r=0
    f1 = [2 / 3, 0.8, 0.0]
    assert m["precision_macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["f1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 6)  # weighted by support
    assert "top5_accuracy" not in m  # only 3 classes


def test_top5_accuracy():
    labels = np.array([0, 7])
    logits = np.tile(np.arange(10.0), (2, 1))  # top-5 is classes 5..9 for both rows
    m = classification_metrics(logits, labels, 10)
    assert m["top5_accuracy"] == 0.5 and m["accuracy"] == 0.0


def test_test_report_files(tmp_path):
    labels = np.array([0, 1, 1, 2])
    predictions = np.array([0, 1, 2, 2])
    write_test_report(tmp_path, one_hot_logits(predictions, 3), labels, ["a", "b", "c"], rows=np.array([5, 6, 7, 8]))
    matrix = json.loads((tmp_path / "test_confusion_matrix.json").read_text())
    assert matrix == {"labels": ["a", "b", "c"], "matrix": [[1, 0, 0], [0, 1, 1], [0, 0, 1]]}
    report = json.loads((tmp_path / "test_per_class.json").read_text())
    assert report["b"]["recall"] == 0.5 and report["c"]["precision"] == 0.5
    saved = json.loads((tmp_path / "test_predictions.json").read_text())
    assert saved["rows"] == [5, 6, 7, 8] and saved["predictions"] == [0, 1, 2, 2]
    assert (tmp_path / "test_confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
