#!/usr/bin/env python3
"""Full-size random CLIP ViT-B/16 parity fixture (NOT committed: ~600 MB).

    .venv-ref/bin/python tools/reference/clip_b16_parity.py OUT_DIR

Writes OUT_DIR/config.json, OUT_DIR/model.safetensors (HF key layout, f32) and
OUT_DIR/io.safetensors with
    pixel_values [2,3,224,224] f32, input_ids [2,77] i64, attention_mask [2,77] i64,
    image_embeds [2,512], text_embeds [2,512]   (projections, NOT normalised),
    vision_last [2,197,768], text_last [2,77,512],
    vision_pooled [2,768], text_pooled [2,512], logits_per_image [2,2].
The config mirrors openai/clip-vit-base-patch16 (written by hand, see common.py),
including its legacy text ids bos 0 / eos 2 / pad 1: with eos_token_id == 2 HF
pools the text at argmax(input_ids) (the first <|endoftext|> = 49407).
Weights use transformers' own default CLIP init (seed 0), not the larger fixture init.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clip_b16_config, load_clip_tokenizer, seed_everything  # noqa: E402

SENTENCES = ["the man on the left wearing a red shirt",
             "A small brown dog next to the bench, far right!"]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    from transformers import CLIPModel

    seed_everything(0)
    cfg = clip_b16_config()
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).eval()
    model.config.to_json_file(str(out / "config.json"))
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})

    with tempfile.TemporaryDirectory() as tmp:
        tok = load_clip_tokenizer(Path(tmp) / "clip")
        enc = tok(SENTENCES, max_length=77, truncation=True, padding="max_length",
                  return_tensors="pt")
    input_ids = enc["input_ids"].to(torch.int64)
    attention_mask = enc["attention_mask"].to(torch.int64)
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 224, 224, generator=g)

    with torch.inference_mode():
        vo = model.vision_model(pixel_values=pixel_values)
        to = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        full = model(pixel_values=pixel_values, input_ids=input_ids,
                     attention_mask=attention_mask)
        io = {
            "pixel_values": pixel_values, "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_embeds": model.visual_projection(vo.pooler_output),
            "text_embeds": model.text_projection(to.pooler_output),
            "vision_last": vo.last_hidden_state, "text_last": to.last_hidden_state,
            "vision_pooled": vo.pooler_output, "text_pooled": to.pooler_output,
            "logits_per_image": full.logits_per_image,
        }
    save_file({k: v.contiguous().clone() for k, v in io.items()}, str(out / "io.safetensors"),
              metadata={"format": "pt"})
    print(f"wrote {out}: {len(sd)} weight tensors, input_ids[0][:12]={input_ids[0][:12].tolist()}")


if __name__ == "__main__":
    main()
