"""Config parsing, pipelines.yaml caption blocks, prompt provenance, request building of every engine."""
import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from captioning import prompt
from captioning.config import CaptionConfig
from _sigma.config import ConfigError, load_yaml, parse

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_share_captioner():
    c = CaptionConfig()
    g = c.generation
    assert (g.num_beams, g.do_sample, g.temperature, g.repetition_penalty, g.max_length) == (3, True, 1.0, 1.5, 500)
    assert c.prompt == "Analyze the image in a comprehensive and detailed manner."


def test_parse_and_errors():
    c = parse(CaptionConfig, {"engine": "openai", "openai": {"concurrency": 4}, "runtime_env_pip": ["transformers==4.31.0"],
                              "resources": {"batch_size": 4, "actors": 2}, "vllm": {"engine_kwargs": {"max_model_len": 2048}}})
    assert c.openai.concurrency == 4 and c.runtime_env_pip == ("transformers==4.31.0",) and c.resources.actors == 2
    with pytest.raises(ConfigError, match="engine"):
        parse(CaptionConfig, {"engine": "tgi"})
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        parse(CaptionConfig, {"bogus": 1})
    # The 60/40 long/short mix belongs to the training config (training.long_ratio): a caption-side
    # copy was read by nothing, so it is gone and a leftover key is an error, not silently ignored.
    with pytest.raises(ConfigError, match="unknown key 'long_ratio'"):
        parse(CaptionConfig, {"long_ratio": 0.6})


def test_pipelines_yaml_caption_blocks_parse():
    from curation.config import PipelineConfig

    data = load_yaml(REPO / "pipelines.yaml")
    for name, section in data["pipelines"].items():
        cfg = parse(PipelineConfig, {**section, "name": name}, f"pipelines.{name}")
        assert isinstance(cfg.caption, CaptionConfig)


def test_prompt_hash_and_params():
    a, b = CaptionConfig(), CaptionConfig(prompt="Describe the image.")
    assert prompt.prompt_hash(a) != prompt.prompt_hash(b) and len(prompt.prompt_hash(a)) == 16
    assert prompt.prompt_hash(a) == prompt.prompt_hash(CaptionConfig(engine="openai"))
    p = json.loads(prompt.generation_params(a, seed=7))
    assert p["seed"] == 7 and p["num_beams"] == 3 and p["repetition_penalty"] == 1.5


def test_messages_same_prompt_for_all_engines():
    c = CaptionConfig(system_prompt="You are a captioner.")
    im = Image.new("RGB", (10, 8), (255, 0, 0))
    m_hf = prompt.messages(c, image=im)
    m_vllm = prompt.messages(c, image_pil=im)
    m_http = prompt.messages(c, image_url="data:image/jpeg;base64,AAAA")
    assert m_hf[0] == m_vllm[0] == {"role": "system", "content": "You are a captioner."}
    assert m_hf[1]["content"][-1] == m_vllm[1]["content"][-1] == m_http[1]["content"][-1] == \
        {"type": "text", "text": c.prompt}
    # transformers chat templates test type == "image"; vLLM's chat parser only knows image_pil /
    # image_url / image_embeds / input_image (checked against vLLM itself in test_vllm_engine.py).
    assert m_hf[1]["content"][0] == {"type": "image", "image": im}
    assert m_vllm[1]["content"][0] == {"type": "image_pil", "image_pil": im}
    assert m_http[1]["content"][0]["type"] == "image_url"


def test_data_url_roundtrip_and_downscale():
    im = Image.new("RGB", (300, 100), (0, 128, 255))
    url = prompt.data_url(im, max_side=60)
    assert url.startswith("data:image/jpeg;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.size == (60, 20)


def test_openai_payload():
    from captioning.openai_engine import OpenAIClient

    c = parse(CaptionConfig, {"engine": "openai", "model": "m", "generation": {"max_new_tokens": 32}})
    body = OpenAIClient(c).payload(Image.new("RGB", (8, 8)), seed=3)
    assert body["model"] == "m" and body["seed"] == 3 and body["max_tokens"] == 32
    assert body["repetition_penalty"] == 1.5 and body["temperature"] == 1.0
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    text_only = parse(CaptionConfig, {"engine": "openai", "openai": {"send_images": False}})
    assert OpenAIClient(text_only).payload(Image.new("RGB", (8, 8)), 0)["messages"][0]["content"] == \
        [{"type": "text", "text": text_only.prompt}]


def test_runtime_env():
    from captioning.stage import runtime_env

    hf = parse(CaptionConfig, {"runtime_env_pip": ["transformers==4.31.0"], "runtime_env_vars": {"A": "1"}})
    assert runtime_env(hf) == {"pip": ["transformers==4.31.0"], "env_vars": {"A": "1"}}
    assert runtime_env(CaptionConfig()) is None
    http = parse(CaptionConfig, {"engine": "openai", "runtime_env_pip": ["x==1"]})
    assert runtime_env(http) is None  # the HTTP client needs no model packages


def test_control_chars_removed():
    from captioning.postprocess import clean

    assert clean("A red\x12 car\ufffd on a\x00 road.") == "A red car on a road."
