#!/usr/bin/env python3
"""Checks examples/learn_while_serving's decoder against transformers' Llama and PEFT.

The example writes, into target/learn_while_serving/: its frozen base under
transformers' parameter names (base.safetensors, config.json), the served-only
user's PEFT adapter (adapters/eve) and its first probe (probe.safetensors: the
tokens, and the logits it served for that user and for the base model alone).
This builds `LlamaForCausalLM` from the same config and weights, puts the
adapter on it with PEFT, runs the probe's tokens (f32, CPU) and compares the
logits: the largest difference over the largest logit must stay within what
the example's dtype allows.

Needs torch, transformers and peft (not in CI):

    cargo run --release --features candle --example learn_while_serving
    python3 scripts/llama-check.py [target/learn_while_serving]
"""
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

# Relative error allowed per dtype of the example's kernels: f32 differs from
# torch only in summation order; bf16 rounds the projections' inputs.
TOLERANCE = {"F32": 1e-4, "BF16": 3e-2, "F16": 1e-2}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/learn_while_serving")
    config = json.loads((out / "config.json").read_text())
    dtype = config.pop("lora_kernels_dtype")
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    missing, unexpected = model.load_state_dict(load_file(out / "base.safetensors"), strict=False)
    if missing or unexpected:
        print(f"base weights: missing {missing}, unexpected {unexpected}")
        return 1
    model = PeftModel.from_pretrained(model, out / "adapters" / "eve").eval()
    probe = load_file(out / "probe.safetensors")
    tokens = probe["tokens"].to(torch.int64).unsqueeze(0)
    ok = True
    with torch.no_grad():
        for name, logits in [("served_only", model(tokens).logits[0])]:
            ok &= compare(name, logits, probe[name], TOLERANCE[dtype])
        with model.disable_adapter():
            base = model(tokens).logits[0]
            ok &= compare("base", base, probe["base"], TOLERANCE[dtype])
    # The control: the adapter changes the logits by far more than the
    # tolerance, so the comparison above can fail.
    moved = (base - probe["served_only"]).abs().max().item() / base.abs().max().item()
    caught = moved > 10 * TOLERANCE[dtype]
    print(f"control: served-only vs base logits differ by {moved:.2e}: {'caught' if caught else 'NOT caught'}")
    return 0 if ok and caught else 1


def compare(name: str, want: torch.Tensor, got: torch.Tensor, tolerance: float) -> bool:
    err = (want - got).abs().max().item() / want.abs().max().item()
    passed = err <= tolerance
    print(f"{name}: max |example - transformers+PEFT| / max |logit| = {err:.2e} "
          f"(tolerance {tolerance:.0e}): {'pass' if passed else 'FAIL'}")
    return passed


if __name__ == "__main__":
    sys.exit(main())
