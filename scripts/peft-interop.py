#!/usr/bin/env python3
"""Checks lora-kernels' PEFT files against HF PEFT itself (needs torch, peft,
safetensors; not run by CI, which has no torch).

  peft-interop.py make-fixtures DIR   PEFT writes adapters of two tiny models
                                       (Llama-shaped with rank/alpha patterns;
                                       GPT-2 Conv1D with fan_in_fan_out and
                                       rsLoRA), plus each module's base weight,
                                       inputs and PEFT's outputs
                                       (DIR/<case>/expected.safetensors).
                                       tests/peft_fixtures.rs reads them.
  peft-interop.py check-saved FIXTURE SAVED
                                       PEFT loads FIXTURE and SAVED (the
                                       crate's save of it) onto the same base
                                       model: every module's outputs must be
                                       bit-identical.
"""
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # older transformers
    from transformers.modeling_utils import Conv1D

TOKENS = 5


class Block(nn.Module):
    def __init__(self, k, kv, inter):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(k, k, bias=False)
        self.self_attn.v_proj = nn.Linear(k, kv, bias=False)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(inter, k, bias=False)


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block(24, 16, 40) for _ in range(2)])


class Gpt2(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([nn.Module() for _ in range(2)])
        for h in self.transformer.h:
            h.attn = nn.Module()
            h.attn.c_attn = Conv1D(3 * 24, 24)  # weight [in, out]
            h.attn.c_attn.bias.data.zero_()


CASES = {
    "llama_patterns": (
        Llama,
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 3},
            alpha_pattern={"v_proj": 5},
        ),
    ),
    "gpt2_fan_in_fan_out_rslora": (
        Gpt2,
        dict(r=6, lora_alpha=9, target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True),
    ),
}


def lora_modules(model):
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def outputs(peft_model, base_weights, inputs):
    modules = lora_modules(peft_model)
    return {path: modules[path](inputs[path]) for path in base_weights}


def make_fixtures(out):
    for case, (model_cls, cfg) in CASES.items():
        torch.manual_seed(0)
        base = model_cls()
        for name, p in base.named_parameters():
            # Biases stay zero: the kernels compute no bias.
            nn.init.uniform_(p, -1.0, 1.0) if name.endswith("weight") else nn.init.zeros_(p)
        model = get_peft_model(base, LoraConfig(**cfg))
        with torch.no_grad():
            for m in lora_modules(model).values():
                # Random A and B: B starts at zero, which would test nothing.
                nn.init.uniform_(m.lora_A["default"].weight, -1.0, 1.0)
                nn.init.uniform_(m.lora_B["default"].weight, -1.0, 1.0)
        model.eval()
        case_dir = Path(out) / case
        model.save_pretrained(case_dir)
        expected = {}
        with torch.no_grad():
            for path, m in lora_modules(model).items():
                w = m.get_base_layer().weight.detach().clone()
                x = torch.rand(TOKENS, m.in_features) * 2 - 1
                # Kernels' layout [out, in]; Conv1D keeps [in, out].
                expected[f"{path}.weight_out_in"] = w.T.contiguous() if m.fan_in_fan_out else w
                expected[f"{path}.x"] = x
                expected[f"{path}.y"] = m(x)
        save_file(expected, case_dir / "expected.safetensors")
        print(f"{case}: {len(lora_modules(model))} modules written to {case_dir}")


def peft_outputs(case, adapter_dir, expected):
    """PEFT loads `adapter_dir` onto the case's base model (weights from the
    fixture) and computes every module's y for the fixture's inputs."""
    model_cls, _ = CASES[case]
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(model_cls(), adapter_dir)
    model.eval()
    ys = {}
    with torch.no_grad():
        for path, m in lora_modules(model).items():
            w = expected[f"{path}.weight_out_in"]
            m.get_base_layer().weight.copy_(w.T if m.fan_in_fan_out else w)
            ys[path] = m(expected[f"{path}.x"])
    return ys


def check_saved(fixture, saved):
    fixture, saved = Path(fixture), Path(saved)
    case = fixture.name
    expected = load_file(fixture / "expected.safetensors")
    original = peft_outputs(case, fixture, expected)
    resaved = peft_outputs(case, saved, expected)
    if original.keys() != resaved.keys():
        sys.exit(f"{case}: modules differ: {sorted(original)} vs {sorted(resaved)}")
    differ = [p for p in original if not torch.equal(original[p], resaved[p])]
    config = json.loads((saved / "adapter_config.json").read_text())
    print(f"{case}: PEFT loaded the crate's save: {len(resaved)} modules, r={config['r']}, "
          f"lora_alpha={config['lora_alpha']}, {len(config['rank_pattern'])} rank_pattern and "
          f"{len(config['alpha_pattern'])} alpha_pattern entries; outputs bit-identical to PEFT's "
          f"own file in {len(original) - len(differ)} of {len(original)} modules")
    if differ:
        sys.exit(f"{case}: outputs differ in {differ}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-fixtures":
        make_fixtures(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "check-saved":
        check_saved(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
