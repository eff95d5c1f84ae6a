"""`ekg export`: ONNX and TorchScript files that compute what the PyTorch model computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ekg.cli import main
from ekg.errors import EkgError
from ekg.export import export


@pytest.fixture
def pruned_ckpt(slim_checkpoint) -> Checkpoint:
    return slim_checkpoint


def test_onnx_export_matches_pytorch_at_another_batch_size(pruned_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    res = export(pruned_ckpt, tmp_path / "m.onnx")
    assert res.format == "onnx" and res.max_abs_diff < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(9, 3, 32, 32)
    got = sess.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = pruned_ckpt.model(x).numpy()
    assert np.allclose(got, want, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["ekg.preprocess"])["normalization"]["name"] == "cifar10"
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["input"] == ["batch", 3, 32, 32] and side["format"] == "onnx"


def test_torchscript_export_via_cli(pruned_ckpt, tmp_path, capsys):
    src = tmp_path / "m.pt"
    save_checkpoint(pruned_ckpt, src)
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "m.ts")]) == 0
    assert "torchscript" in capsys.readouterr().out
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), load_checkpoint(src).model.eval()(x), atol=1e-5)


def test_export_errors(pruned_ckpt, tmp_path, capsys):
    with pytest.raises(EkgError, match="export format"):
        export(pruned_ckpt, tmp_path / "m.bin")
    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ekg: error:") and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_a_failed_check_leaves_no_file(pruned_ckpt, tmp_path):
    with pytest.raises(EkgError, match="differs from the PyTorch model"):
        export(pruned_ckpt, tmp_path / "m.ts", atol=-1.0)  # an impossible tolerance
    assert list(tmp_path.iterdir()) == []
