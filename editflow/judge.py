"""VLM judges of edit quality (GEdit-Bench / ImgEdit style): `JUDGES` maps `editflow eval --judge` names to
classes with `from_pretrained` and `score`.

A judge scores (source, edited, instruction) -> {name: value}. `QwenVLJudge` asks a local
Qwen2.5-VL for a semantic-consistency score (does the edit follow the instruction?) and a
perceptual-quality score, both 0-10, and reports GEdit's overall score sqrt(SC * PQ). Answers it
cannot parse are NaN and counted, never guessed.
"""

from __future__ import annotations

import math
import re

import torch
from PIL import Image

from editflow.data.images import to_rgb

PROMPT = (
    "The first image is the original, the second is the result of editing it with the instruction: "
    "\"{instruction}\". Rate from 0 to 10 how well the second image follows the instruction while keeping "
    "everything else (SC), and from 0 to 10 its visual quality (PQ). Answer exactly as: SC=<number> PQ=<number>"
)
SCORE = re.compile(r"\b(SC|PQ)\s*[=:]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_scores(text: str) -> dict[str, float]:
    found = {k.upper(): min(10.0, float(v)) for k, v in SCORE.findall(text)}
    sc, pq = found.get("SC", math.nan), found.get("PQ", math.nan)
    overall = math.sqrt(sc * pq) if not (math.isnan(sc) or math.isnan(pq)) else math.nan
    return {"judge_sc": sc, "judge_pq": pq, "judge_overall": overall, "judge_parsed": float(not math.isnan(overall))}


class QwenVLJudge:
    name = "qwen-vl"

    def __init__(self, model, processor, max_new_tokens: int = 24):
        self.model, self.processor, self.max_new_tokens = model.eval(), processor, max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> "QwenVLJudge":
        from transformers import Qwen2_5_VLForConditionalGeneration

        from editflow.models.build import relocate_asset
        from editflow.models.conditioner import load_processor

        path = relocate_asset(path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, load_processor(path))

    @torch.no_grad()
    def score(self, source: Image.Image, edited: Image.Image, instruction: str) -> dict[str, float]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": PROMPT.format(instruction=instruction)}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[to_rgb(source), to_rgb(edited)],
                                return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return parse_scores(answer)


JUDGES = {"qwen": QwenVLJudge}
