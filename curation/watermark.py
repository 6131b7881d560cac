"""The LAION-5B watermark detector (github:LAION-AI/LAION-5B-WatermarkDetection), loaded from its
released weights (`models/watermark_model_v1.pt`: a torch state dict, bare or under "weights").

Published model (its example_use.py / inference.py):
- timm `efficientnet_b3a` (timm >= 0.9 maps that old name to `efficientnet_b3`, same layers and
  state keys) with its classifier replaced by
  Linear(1536, 625) -> ReLU -> Dropout(0.3) -> Linear(625, 256) -> ReLU -> Linear(256, 2)
  (state keys classifier.0 / classifier.3 / classifier.5; 1536 = the backbone's num_features);
- preprocessing: PIL RGB resized to exactly 256 x 256 (bilinear, aspect ratio NOT kept), to
  [0, 1], ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225);
- P(watermark) = softmax(logits)[:, 0] (class 0 = watermark, 1 = clear; LAION's `pwatermark`).
The tiny twin (curation/tiny.py) is the same EfficientNet class and head layout on timm's
`test_efficientnet` backbone (num_features 256), selected with score.watermark_arch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

SIZE = 256
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
WATERMARK_CLASS = 0


def head(in_features: int) -> nn.Sequential:
    """LAION's replacement classifier (the indices give the state keys classifier.0/3/5)."""
    return nn.Sequential(nn.Linear(in_features, 625), nn.ReLU(), nn.Dropout(p=0.3),
                         nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))


def build(arch: str) -> nn.Module:
    """timm EfficientNet `arch` (2 classes) with LAION's head, random weights."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=2)
    model.classifier = head(model.num_features)
    return model


def load_watermark(path: str, arch: str = "efficientnet_b3") -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "weights" in state and isinstance(state["weights"], dict):
        state = state["weights"]  # the layout inference.py reads
    model = build(arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # name the file and the arch: a b3 file under another arch fails here
        raise ValueError(f"{path}: not a {arch} watermark state dict ({str(e).splitlines()[0]})") from None
    return model.eval()


def preprocess(img) -> np.ndarray:
    """PIL RGB image -> (3, 256, 256) float32, the published transform (Resize((256, 256)) on PIL
    is PIL's bilinear with its antialiasing, then ToTensor and Normalize)."""
    from PIL import Image

    a = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255.0  # (256, 256, 3)
    return ((a - MEAN) / STD).transpose(2, 0, 1)


class WatermarkScorer:
    """P(watermark) of a batch of decoded images."""

    def __init__(self, path: str, arch: str, device: str = "cpu", dtype=torch.float32):
        self.model = load_watermark(path, arch).to(device, dtype)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, arrays: list[np.ndarray]) -> np.ndarray:
        """[(3, 256, 256)] -> (n,) float64 probabilities."""
        if not arrays:
            return np.zeros(0)
        x = torch.from_numpy(np.stack(arrays)).to(self.device, self.dtype)
        return torch.softmax(self.model(x).float(), dim=1)[:, WATERMARK_CLASS].double().cpu().numpy()
