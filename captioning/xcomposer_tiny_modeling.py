"""Remote code of the tiny test captioner with Share-Captioner's model interface.

Share-Captioner (`Lin-Chen/ShareCaptioner`) is an InternLM-XComposer-7B (v1) derivative whose
`trust_remote_code` model exposes `encode_text`, `encode_img`, `vis_processor`, `internlm_model`,
`eoh`/`eoa` and `decode_text` instead of a processor + chat template. Its code and weights cannot
be fetched here, so `captioning/tiny.py` saves THIS file beside a random-weight model as the
folder's remote code (config.json `auto_map`); `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` then loads it offline exactly the way the real one is loaded.

The parts are real transformers models (a Llama causal LM as `internlm_model`, a CLIP vision
tower + linear projection as the image encoder); only their sizes are tiny. Self-contained on
purpose: transformers copies this single file into its modules cache.
"""
import torch
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig,
                          PreTrainedModel)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class XComposerTinyConfig(PretrainedConfig):
    model_type = "xcomposer_tiny"

    def __init__(self, text_config=None, vision_config=None, image_size=32, eoh="<TOKENS_UNUSED_0>",
                 eoa="<TOKENS_UNUSED_1>", **kwargs):
        super().__init__(**kwargs)
        self.text_config = dict(text_config or {})
        self.vision_config = dict(vision_config or {})
        self.image_size = image_size
        self.eoh, self.eoa = eoh, eoa


class _VisProcessor:
    """PIL RGB -> (3, S, S) float tensor: bicubic resize to S x S, CLIP normalisation (as XComposer)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        from PIL import Image

        img = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float() / 255.0  # (3, S, S) in [0, 1]
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        return (x - mean) / std


class InternLMXComposerForCausalLM(PreTrainedModel):
    config_class = XComposerTinyConfig
    base_model_prefix = "xcomposer"
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.internlm_model = LlamaForCausalLM(LlamaConfig(**config.text_config))
        vis = CLIPVisionConfig(**config.vision_config)
        self.visual_encoder = CLIPVisionModel(vis)
        self.internlm_proj = nn.Linear(vis.hidden_size, self.internlm_model.config.hidden_size)
        self.vis_processor = _VisProcessor(config.image_size)
        self.eoh, self.eoa = config.eoh, config.eoa
        self.tokenizer = None  # set by the caller, as Share-Captioner's scripts do
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def encode_text(self, text, add_special_tokens=False):
        """text -> its token embeddings (1, L, D) from the language model's embedding table."""
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
        return self.internlm_model.get_input_embeddings()(ids.to(self.device))

    def encode_img(self, image):
        """(B, 3, S, S) -> image tokens in the language model's space (B, n_patches + 1, D)."""
        feats = self.visual_encoder(pixel_values=image.to(self.device, self.dtype)).last_hidden_state
        return self.internlm_proj(feats)

    def decode_text(self, out_embeds):
        """Generated ids (list with one (T,) tensor) -> text up to the end-of-answer marker."""
        text = self.tokenizer.batch_decode(out_embeds, skip_special_tokens=True)[0]
        return text.split(self.eoa)[0]

    def forward(self, *args, **kwargs):  # the XComposer interface generates through internlm_model
        return self.internlm_model(*args, **kwargs)
