"""`seqvision segment` and `seqvision eval-seg` end to end, bad inputs, and crash safety."""

import json

import h5py
import numpy as np
import pytest

import seqvision.eval.em.infer as em_segmentation
from seqvision.cli import main
from seqvision.data import LABELS_KEY, synthetic_em_volume, write_cremi
from seqvision.eval.em import SegmenterConfig, save_segmenter

SEGMENT = ["--window", "16", "32", "32", "--method", "skimage"]


@pytest.fixture(scope="module")
def cremi(tmp_path_factory):
    """A small synthetic volume in CREMI layout (raw and neuron ids)."""
    raw, labels = synthetic_em_volume((16, 48, 40), seed=1)
    return write_cremi(tmp_path_factory.mktemp("data") / "sample.h5", raw, labels)


def segment(checkpoint, raw, output, *extra):
    return main(
        [
            "segment",
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(raw),
            "--output",
            str(output),
            *SEGMENT,
            *extra,
        ]
    )


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_segment_then_eval_seg(tmp_path, cremi, tiny_checkpoint, capsys):
    output = tmp_path / "seg.h5"
    code = segment(
        tiny_checkpoint, f"{cremi}:volumes/raw", output, "--threshold", "0.3", "0.7", "--batch-size", "2"
    )
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    with h5py.File(output, "r") as file:
        affinities = file["volumes/affinities"][...]
        assert affinities.shape == (3, 16, 48, 40) and affinities.dtype == np.float32
        assert affinities.min() >= 0 and affinities.max() <= 1
        first, second = file[LABELS_KEY], file[f"{LABELS_KEY}_threshold_0.7"]
        assert first.dtype == np.uint64 and first.shape == (16, 48, 40)
        assert first.attrs["threshold"] == 0.3 and second.attrs["threshold"] == 0.7
        assert len(np.unique(second[...])) <= len(np.unique(first[...]))
        np.testing.assert_array_equal(first.attrs["resolution"], [40.0, 4.0, 4.0])  # copied from the input

    report = tmp_path / "scores.json"
    assert main(["eval-seg", "--pred", str(output), "--gt", str(cremi), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("VOI split", "VOI merge", "VOI sum", "ARAND"))
    scores = json.loads(report.read_text())
    assert scores["voi_sum"] == pytest.approx(scores["voi_split"] + scores["voi_merge"])
    assert 0 <= scores["arand"] <= 1 and scores["ground_truth"] == str(cremi)
    assert leftovers(tmp_path) == []


def test_eval_seg_of_the_ground_truth_itself_is_perfect(tmp_path, cremi, capsys):
    report = tmp_path / "perfect.json"
    assert (
        main(["eval-seg", "--pred", f"{cremi}:{LABELS_KEY}", "--gt", str(cremi), "--json", str(report)]) == 0
    )
    scores = json.loads(report.read_text())
    assert scores["voi_sum"] == pytest.approx(0, abs=1e-12) and scores["arand"] == pytest.approx(0, abs=1e-12)
    assert "VOI sum    0.0000" in capsys.readouterr().out


def test_eval_seg_refuses_volumes_of_different_shapes(tmp_path, cremi, capsys):
    other = write_cremi(tmp_path / "other.h5", np.zeros((4, 8, 8), np.uint8), np.ones((4, 8, 8), np.uint64))
    assert main(["eval-seg", "--pred", str(other), "--gt", str(cremi)]) == 2
    assert "must match" in capsys.readouterr().err


def test_segment_refuses_bad_inputs_and_writes_nothing(tmp_path, cremi, tiny_checkpoint, capsys):
    output = tmp_path / "seg.h5"
    nan = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    nan[5, 6, 7] = np.nan
    with h5py.File(tmp_path / "bad.h5", "w") as file:
        file["volumes/raw"] = nan
        file["flat"] = np.zeros((32, 32), np.uint8)
    wrong = SegmenterConfig(hidden_size=32, encoder_kwargs=dict(dims=(8, 8, 8, 8), depths=(0, 0, 0, 1)))
    wrong_checkpoint = save_segmenter(wrong.build(), tmp_path / "wrong.safetensors", wrong)
    state_of_other = tmp_path / "wrong.json"
    state_of_other.write_text(json.dumps({"hidden_size": 16, "encoder_kwargs": {"dims": [8, 8, 8, 8]}}))
    cases = [
        (tiny_checkpoint, tmp_path / "bad.h5", "NaN"),
        (tiny_checkpoint, f"{tmp_path / 'bad.h5'}:flat", "3-D"),
        (tiny_checkpoint, f"{cremi}:volumes/missing", "no dataset 'volumes/missing'"),
        (tiny_checkpoint, tmp_path / "absent.h5", "no such file"),
        (tmp_path / "absent.safetensors", cremi, "no such checkpoint"),
    ]
    for checkpoint, raw, message in cases:
        assert segment(checkpoint, raw, output) == 2
        assert message in capsys.readouterr().err
    # A checkpoint of another architecture (its config overridden by a mismatching one).
    assert segment(wrong_checkpoint, cremi, output, "--config", str(state_of_other)) == 2
    err = capsys.readouterr().err
    assert "do not fit the architecture" in err and "shapes:" in err
    assert not output.exists() and leftovers(tmp_path) == []


def test_a_crash_mid_write_leaves_no_partial_file(tmp_path, tiny_checkpoint, monkeypatch):
    raw, labels = synthetic_em_volume((16, 32, 32), seed=2)  # one window: three runs stay quick
    cremi = write_cremi(tmp_path / "small.h5", raw, labels)
    output = tmp_path / "seg.h5"
    real = em_segmentation._write_volume
    calls = []

    def crash_on_second(file, key, data, attrs):
        calls.append(key)
        if len(calls) == 2:  # the affinities are written, the segmentation is not
            raise RuntimeError("simulated crash")
        real(file, key, data, attrs)

    monkeypatch.setattr(em_segmentation, "_write_volume", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        segment(tiny_checkpoint, cremi, output)
    assert calls == ["volumes/affinities", LABELS_KEY]
    assert not output.exists() and leftovers(tmp_path) == []

    # A crash while replacing an earlier result leaves that result whole.
    monkeypatch.setattr(em_segmentation, "_write_volume", real)
    assert segment(tiny_checkpoint, cremi, output) == 0
    before = output.read_bytes()
    calls.clear()
    monkeypatch.setattr(em_segmentation, "_write_volume", crash_on_second)
    with pytest.raises(RuntimeError):
        segment(tiny_checkpoint, cremi, output, "--threshold", "0.2")
    assert output.read_bytes() == before and leftovers(tmp_path) == []
