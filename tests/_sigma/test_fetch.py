"""Models from object storage (_sigma.fetch) against a real S3 HTTP endpoint (moto server): fetched
once per node into a cache keyed by the objects' sizes and ETags, byte-identical to the source, never
used half-downloaded, one download for concurrent processes, URIs checked up front by check_paths."""
from __future__ import annotations

import dataclasses
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _sigma import fetch, fs
from _sigma.config import ConfigError, check_paths, parse

REPO = Path(__file__).resolve().parents[2]


def _put_dir(local: Path, uri: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.write_bytes(fs.join(uri, p.relative_to(local).as_posix()), p.read_bytes())


def _same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def test_folder_and_file_fetched_once_identical(s3_bucket, tiny_models, tmp_path):
    cache = str(tmp_path / "cache")
    _put_dir(tiny_models / "t5", f"{s3_bucket}/m/t5")
    fs.write_bytes(f"{s3_bucket}/m/aesthetic.pth", (tiny_models / "aesthetic.pth").read_bytes())
    p, new = fetch.fetch(f"{s3_bucket}/m/t5", cache)
    assert new and _same_tree(Path(p), tiny_models / "t5")
    assert fetch.fetch(f"{s3_bucket}/m/t5/", cache) == (p, False)  # same folder, trailing '/': cached
    f, new = fetch.fetch(f"{s3_bucket}/m/aesthetic.pth", cache)
    assert new and Path(f).name == "aesthetic.pth" and filecmp.cmp(f, tiny_models / "aesthetic.pth", shallow=False)
    assert fetch.local_model("org/hub-name") == "org/hub-name" and fetch.local_model("models/x") == "models/x"
    with pytest.raises(fetch.ModelSourceError):
        fetch.fetch(f"{s3_bucket}/m/nothing-here", cache)


def test_changed_object_gets_a_new_copy(s3_bucket, tmp_path):
    cache = str(tmp_path / "cache")
    uri = f"{s3_bucket}/w.bin"
    fs.write_bytes(uri, b"a" * 1000)
    p1, _ = fetch.fetch(uri, cache)
    fs.write_bytes(uri, b"b" * 1000)  # same size, new bytes: a new ETag
    p2, new = fetch.fetch(uri, cache)
    assert new and p1 != p2 and Path(p2).read_bytes() == b"b" * 1000 and Path(p1).read_bytes() == b"a" * 1000


def test_sums_mismatch_is_refused_and_nothing_cached(s3_bucket, tmp_path):
    cache = tmp_path / "cache"
    fs.write_bytes(f"{s3_bucket}/m/w.bin", b"x" * 100)
    fs.write_json(f"{s3_bucket}/m/{fetch.SUMS_NAME}", {"w.bin": {"size": 100, "sha256": "0" * 64}})
    with pytest.raises(fetch.ModelSourceError, match="sha256"):
        fetch.fetch(f"{s3_bucket}/m/w.bin", str(cache))
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no folder at all, no temp folder left


_KILLER = """
import os, signal, sys
from _sigma import fetch
fetch._CHUNK = 1 << 16
real = open
def killing_open(path, mode="r", *a, **k):  # SIGKILL this process once half of the file is written
    f = real(path, mode, *a, **k)
    if "wb" in mode:
        w = f.write
        n = [0]
        def write(b):
            n[0] += len(b)
            r = w(b)
            if n[0] > (1 << 20):
                f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return r
        f.write = write
    return f
fetch.open = killing_open
fetch.fetch(sys.argv[1], sys.argv[2])
"""


def test_killed_download_is_never_used(s3_bucket, tmp_path):
    cache = tmp_path / "cache"
    data = os.urandom(3 << 20)
    uri = f"{s3_bucket}/big.bin"
    fs.write_bytes(uri, data)
    r = subprocess.run([sys.executable, "-c", _KILLER, uri, str(cache)], cwd=REPO, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    left = [p.name for p in cache.iterdir() if p.is_dir()]
    assert left and all(n.startswith(".tmp-") for n in left)  # only a temp folder: the key never appeared
    p, new = fetch.fetch(uri, str(cache))
    assert new and Path(p).read_bytes() == data
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # the stale temp folder is gone


_RACER = """
import sys, time
from _sigma import fetch
t = float(sys.argv[3])
while time.time() < t:
    time.sleep(0.005)
p, new = fetch.fetch(sys.argv[1], sys.argv[2])
print(p, int(new))
"""


def test_concurrent_processes_download_once(s3_bucket, tmp_path):
    import time

    cache = tmp_path / "cache"
    data = os.urandom(8 << 20)
    uri = f"{s3_bucket}/shared.bin"
    fs.write_bytes(uri, data)
    start = str(time.time() + 4)  # every process starts its fetch at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, str(cache), start], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    lines = [o[0].split() for o in outs]
    assert len({ln[0] for ln in lines}) == 1 and sorted(ln[1] for ln in lines) == ["0", "0", "0", "1"]
    assert Path(lines[0][0]).read_bytes() == data


@dataclasses.dataclass(frozen=True)
class _Models:
    t5: str = dataclasses.field(default="", metadata={"path": True})
    rewards: dict[str, str] = dataclasses.field(default_factory=dict, metadata={"path": True})


def test_check_paths_lists_missing_uris(s3_bucket, tiny_models):
    _put_dir(tiny_models / "t5", f"{s3_bucket}/m/t5")
    check_paths(parse(_Models, {"t5": f"{s3_bucket}/m/t5", "rewards": {"A": f"{s3_bucket}/m/t5/config.json"}}, "p"), "p")
    cfg = parse(_Models, {"t5": f"{s3_bucket}/m/t6", "rewards": {"A": "s3://no-such-bucket-sigma/x"}}, "p")
    with pytest.raises(ConfigError) as e:
        check_paths(cfg, "p")
    assert f"p.t5: {s3_bucket}/m/t6 does not exist" in str(e.value) and "p.rewards.A" in str(e.value)
    with pytest.raises(ConfigError, match="unsupported scheme"):
        check_paths(parse(_Models, {"t5": "hdfs://x/y"}, "p"), "p")


def test_loaders_read_uris_like_local_paths(s3_bucket, tiny_models, tmp_path, monkeypatch):
    """load_t5 / load_vae / load_clip and the aesthetic head from s3:// give the same outputs as
    from the local folders."""
    import torch

    from _sigma.models import load_clip, load_t5, load_vae
    from curation.score import load_aesthetic

    monkeypatch.setenv("SIGMA_MODEL_CACHE", str(tmp_path / "cache"))
    for name in ("t5", "vae", "clip"):
        _put_dir(tiny_models / name, f"{s3_bucket}/m/{name}")
    fs.write_bytes(f"{s3_bucket}/m/aesthetic.pth", (tiny_models / "aesthetic.pth").read_bytes())
    with torch.inference_mode():
        (tok_a, t5_a), (tok_b, t5_b) = load_t5(str(tiny_models / "t5")), load_t5(f"{s3_bucket}/m/t5")
        ids = tok_a(["a red fox"], return_tensors="pt").input_ids
        assert torch.equal(ids, tok_b(["a red fox"], return_tensors="pt").input_ids)
        assert torch.equal(t5_a(input_ids=ids).last_hidden_state, t5_b(input_ids=ids).last_hidden_state)
        x = torch.rand(1, 3, 32, 32)
        va, vb = load_vae(str(tiny_models / "vae")), load_vae(f"{s3_bucket}/m/vae")
        assert torch.equal(va.encode(x).latent_dist.mean, vb.encode(x).latent_dist.mean)
        ca = load_clip(str(tiny_models / "clip/model_config.json"), str(tiny_models / "clip/open_clip_model.safetensors"))
        cb = load_clip(f"{s3_bucket}/m/clip/model_config.json", f"{s3_bucket}/m/clip/open_clip_model.safetensors")
        size = ca[0].visual.image_size
        img = torch.rand(1, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))
        ea, eb = ca[0].encode_image(img), cb[0].encode_image(img)
        assert torch.equal(ea, eb)
        ma, mb = load_aesthetic(str(tiny_models / "aesthetic.pth"), ea.shape[1]), load_aesthetic(f"{s3_bucket}/m/aesthetic.pth", ea.shape[1])
        assert torch.equal(ma(ea), mb(eb))
