"""Each FID protocol reproduces its tool bit for bit: the packages themselves (pytorch-fid 0.3.0,
clean-fid 0.1.35) run on the same image files, with the same Inception weights file, and the
tensors they feed the network (and the FID they report) are compared with ours."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid
from evaldata import random_image

REPO = Path(__file__).resolve().parents[2]


def _folder(d: Path, seed: int, sizes) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = d / f"{i:03d}.png"
        random_image(rng, w, h).save(p)
        paths.append(p)
    return paths


MIXED = [(97, 61), (300, 200), (64, 640), (512, 384), (299, 299), (33, 47)]  # up- and down-scaling


@pytest.fixture(scope="module")
def pytorch_fid_net(tmp_path_factory):
    """pytorch-fid's own FID Inception with seeded random weights: its weights file is put where
    torch.hub looks first (no network), then pytorch-fid loads it through its usual code path."""
    import torchvision

    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints" / os.path.basename(FID_WEIGHTS_URL)
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    torch.save(net.state_dict(), ckpt)
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    torch.hub.set_dir(str(home / "hub"))
    yield InceptionV3
    torch.hub.set_dir(os.path.join(old or os.path.expanduser("~/.cache/torch"), "hub"))
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old


def test_pytorch_fid_network_input_is_bit_identical(tmp_path, pytorch_fid_net):
    from pytorch_fid.fid_score import get_activations

    files = _folder(tmp_path / "mixed", 1, MIXED)
    model = pytorch_fid_net([3])  # resize_input and normalize_input on: pytorch-fid's defaults
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    get_activations([str(f) for f in files], model, batch_size=1, dims=2048, device="cpu", num_workers=0)
    assert len(seen) == len(files)
    for f, theirs in zip(files, seen):
        ours = fid.preprocess(Image.open(f), "pytorch-fid")
        assert torch.equal(ours, theirs[0]), f


def test_pytorch_fid_activations_with_the_same_network(tmp_path, pytorch_fid_net):
    """get_activations (their loader, resize, normalisation, pooling) == our protocol feeding the
    same network with its resize and normalisation switched off (dims 64: the first block, which
    is where preprocessing can go wrong; the rest of the network is the same module)."""
    import torch.nn.functional as F

    from pytorch_fid.fid_score import get_activations

    files = _folder(tmp_path / "a", 2, [(120, 90)] * 3 + [(640, 480)] * 3)
    theirs = np.concatenate([get_activations([str(f) for f in group], pytorch_fid_net([0]), batch_size=3, dims=64,
                                             device="cpu", num_workers=0) for group in (files[:3], files[3:])])
    net = pytorch_fid_net([0], resize_input=False, normalize_input=False).eval()

    class Ext(torch.nn.Module):
        num_features = 64

        def forward(self, x):
            return F.adaptive_avg_pool2d(net(x)[0], (1, 1)).reshape(x.shape[0], -1).double()

    ours = fid.features(Ext(), [Image.open(p) for p in files], "pytorch-fid")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def inception_file():
    from eval.fid_weights import ensure

    return ensure(REPO / "models" / "fid")


@pytest.fixture(scope="module")
def nvidia_layout(inception_file, tmp_path_factory):
    """The same TF-Inception layers saved the way clean-fid expects NVIDIA's file
    (inception-2015-12-05.pt with `.layers`), so clean-fid's InceptionV3W loads them itself."""
    layers = torch.jit.load(str(inception_file)).net.layers

    class Nvidia(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    d = tmp_path_factory.mktemp("cleanfid")
    torch.jit.script(Nvidia()).save(str(d / "inception-2015-12-05.pt"))
    return d


def test_clean_fid_network_input_is_bit_identical(tmp_path):
    from cleanfid.fid import get_folder_features

    files = _folder(tmp_path / "mixed", 4, MIXED)
    seen = []

    def capture(x):  # clean-fid hands the model float images in [0, 255] (299 x 299)
        seen.append(((x - 128) / 128).clone())  # InceptionV3W's own normalisation, as it writes it
        return torch.zeros(x.shape[0], 1)

    get_folder_features(str(tmp_path / "mixed"), capture, num_workers=0, batch_size=2, device=torch.device("cpu"),
                        mode="clean", verbose=False)
    theirs = torch.cat(seen)
    ours = torch.stack([fid.preprocess(Image.open(f), "clean-fid") for f in sorted(files)])
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_clean_fid_features_with_the_same_weights_file(tmp_path, inception_file, nvidia_layout):
    """get_folder_features with clean-fid's own InceptionV3W loading the TF-Inception file ==
    our clean-fid protocol through our TorchScript extractor on the same file."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    files = _folder(tmp_path / "a", 5, MIXED[:4])
    model = InceptionV3W(str(nvidia_layout), download=False)
    theirs = get_folder_features(str(tmp_path / "a"), model, num_workers=0, batch_size=4,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    ours = fid.features(fid.TorchScriptInception(str(inception_file)), [Image.open(p) for p in sorted(files)],
                        "clean-fid")
    assert ours.shape == theirs.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
