"""The pieces every classification-style pipeline shares: metrics, the loss wrapper, the model file."""

import csv

import pytest
import torch
import torch.nn as nn

from seqvision.engine.model_file import read_model_file, save_model_file
from seqvision.eval.classification.classifier import ClassifierWithLoss, classifier_forward
from seqvision.eval.classification.metrics import (
    classification_report,
    confusion_matrix,
    save_confusion_figure,
    write_predictions_csv,
)


def test_report_matches_hand_computed_scores():
    # 3 classes, 5 samples; the rows are probabilities.
    probs = torch.tensor(
        [
            [0.7, 0.2, 0.1],  # label 0: right
            [0.1, 0.6, 0.3],  # label 0: wrong, 0 is third
            [0.2, 0.5, 0.3],  # label 1: right
            [0.5, 0.1, 0.4],  # label 2: wrong, 2 is second
            [0.1, 0.1, 0.8],  # label 2: right
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 2])
    report = classification_report(probs, labels)
    assert report.top1 == pytest.approx(3 / 5)
    assert report.top5 == 1.0  # top-5 of 3 classes: all
    assert report.mean_class_accuracy == pytest.approx((1 / 2 + 1 / 1 + 1 / 2) / 3)
    assert report.confusion == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert confusion_matrix(torch.tensor([1, 1]), torch.tensor([0, 1]), 2).tolist() == [[0, 1], [0, 1]]

    # Invalid samples are counted as skipped, not scored.
    report = classification_report(probs, labels, valid=torch.tensor([1, 0, 1, 0, 1]))
    assert (report.top1, report.samples, report.skipped) == (1.0, 3, 2)
    empty = classification_report(probs, labels, valid=torch.zeros(5))
    assert empty.samples == 0 and empty.skipped == 5 and empty.top1 != empty.top1  # NaN: nothing scored
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_report(probs, torch.tensor([0, 0, 1, 2, 3]))


def test_top5_counts_a_label_in_the_top_five(tmp_path):
    probs = torch.arange(10.0).repeat(2, 1)  # class 9 best, then 8, ...
    report = classification_report(probs, torch.tensor([5, 4]))
    assert (report.top1, report.top5) == (0.0, 0.5)
    classes = [f"c{i}" for i in range(10)]
    path = write_predictions_csv(
        tmp_path / "p.csv", ["a", "b"], torch.tensor([5, 4]), probs.softmax(1), classes
    )
    rows = list(csv.DictReader(path.open()))
    assert [r["predicted"] for r in rows] == ["c9", "c9"] and rows[0]["top5"].startswith("c9:")
    figure = save_confusion_figure(tmp_path / "c.png", report.confusion, classes)
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_classifier_with_loss_moves_channels_for_tubelet_models():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x.flatten(1)[:, :3]

    clips = torch.randn(2, 4, 3, 8, 8)  # (B, T, C, H, W)
    ClassifierWithLoss(Probe(), "BTCHW")(clips)
    ClassifierWithLoss(Probe(), "BCTHW")(clips)
    assert seen == [(2, 4, 3, 8, 8), (2, 3, 4, 8, 8)]
    out = classifier_forward(
        ClassifierWithLoss(Probe()),
        {"video": clips, "label": torch.tensor([0, 2]), "unreadable": torch.tensor([1, 2])},
        0,
    )
    expected = nn.functional.cross_entropy(clips.flatten(1)[:, :3], torch.tensor([0, 2]))
    torch.testing.assert_close(out["loss"], expected)
    assert out["unreadable"].item() == 3
    with pytest.raises(ValueError, match="clip_layout"):
        ClassifierWithLoss(Probe(), "TCHW")


def test_model_file_round_trip_and_refusals(tmp_path):
    model = nn.Linear(3, 2)
    tied = nn.ModuleDict({"a": model, "b": model})  # shared storage: written twice, loaded as one
    path = save_model_file(
        tied,
        tmp_path / "m.safetensors",
        task="video",
        config={"model": {"name": "x"}},
        extra={"classes": ["l", "r"]},
    )
    saved = read_model_file(path, "video")
    assert saved.config == {"model": {"name": "x"}} and saved.extra == {"classes": ["l", "r"]}
    torch.testing.assert_close(saved.state["a.weight"], model.weight.detach())
    with pytest.raises(ValueError, match="holds a 'video' model, not a 'caption' one"):
        read_model_file(path, "caption")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_model_file(tmp_path / "junk.safetensors", "video")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_model_file(tmp_path / "missing", "video")
