#!/usr/bin/env python3
"""Times HF PEFT's LoRA on the tour's shapes, the way users run it today
(needs a CUDA GPU, torch and peft; not run by CI, which has no torch).

  peft-bench.py OUT.json [--budget SECONDS] [--smoke]

Rows, all bf16, adapters in bf16 too (autocast_adapter_dtype=False, as the
crate's kernels keep them):
  forward    PEFT's lora.Linear forward, one adapter, and torch's base-only
             F.linear (cuBLAS) in the same run;
  backward   PEFT's backward alone (dx, dA, dB from a saved graph), and
             forward + backward;
  multi      a mixed batch through `adapter_names` (PEFT's per-adapter loop).

Every time: CUDA events, the median of RUNS timed calls after WARMUP, each
call on the next of several model copies whose base weights together exceed
ROTATE_BYTES (several times the L2), on random data (never zeros). The
rows match the tour's JSON rows by (n, k, m, r[, adapters]); scripts/gpu-check
joins them into its report as ours / PEFT. --smoke runs tiny shapes only, to
check the script. Rows past the time budget are left out, and the JSON says
which were.
"""
import json
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

WARMUP, RUNS = 5, 30
ROTATE_BYTES = 256 << 20
DTYPE = torch.bfloat16


class One(nn.Module):
    """A model of one projection, so PEFT wraps exactly one lora.Linear."""

    def __init__(self, n, k):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


def copies_for(n, k):
    return max(1, -(-ROTATE_BYTES // (n * k * 2)))


def models(n, k, r, adapters):
    """Model copies (rotated past L2), each with `adapters` adapters of rank r."""
    out = []
    for _ in range(copies_for(n, k)):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0,
                         init_lora_weights=False)  # random A and B: no zero term
        model = get_peft_model(One(n, k), cfg, adapter_name="a0", autocast_adapter_dtype=False)
        for i in range(1, adapters):
            model.add_adapter(f"a{i}", cfg)
        model = model.to(device="cuda", dtype=DTYPE)
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-1.0, 1.0).mul_(p.shape[-1] ** -0.5)
        out.append(model)
    return out


def median_us(fn, rotate):
    """Median time of fn(i) in microseconds, i cycling through `rotate` copies."""
    for i in range(WARMUP):
        fn(i % rotate)
    times = []
    for i in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % rotate)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def cases(shapes, ranks, ms, deadline, train):
    """(n, k, r, model copies, m) for every case in turn, then True; False
    instead once the time budget has passed."""
    for n, k in shapes:
        for r in ranks:
            copies = models(n, k, r, 1)
            for model in copies:
                model.train(train)
            for m in ms:
                if time.monotonic() > deadline:
                    yield False
                    return
                yield n, k, r, copies, m
            del copies
            torch.cuda.empty_cache()
    yield True


def forward_rows(shapes, ms, ranks, rows, deadline):
    for case in cases(shapes, ranks, ms, deadline, train=False):
        if isinstance(case, bool):
            return case
        n, k, r, copies, m = case
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        with torch.no_grad():
            peft_us = median_us(lambda i: copies[i](x), len(copies))
            weights = [mm.base_model.model.proj.base_layer.weight for mm in copies]
            base_us = median_us(lambda i: torch.nn.functional.linear(x, weights[i]), len(weights))
        rows.append({"kind": "forward", "dtype": "bf16", "n": n, "k": k, "m": m, "r": r,
                     "peft_us": peft_us, "torch_base_us": base_us})
        print(f"forward  n {n:5} k {k:5} m {m:5} r {r:3}: PEFT {peft_us:9.1f} us, "
              f"base {base_us:9.1f} us, PEFT/base {peft_us / base_us:5.2f}")


def backward_rows(shapes, ms, ranks, rows, deadline):
    for case in cases(shapes, ranks, ms, deadline, train=True):
        if isinstance(case, bool):
            return case
        n, k, r, copies, m = case
        x = torch.randn(m, k, device="cuda", dtype=DTYPE, requires_grad=True)
        g = torch.randn(m, n, device="cuda", dtype=DTYPE)
        params = [[p for p in mm.parameters() if p.requires_grad] for mm in copies]
        ys = [mm(x) for mm in copies]  # graphs kept for the backward-only timing

        def backward(i):
            torch.autograd.grad(ys[i], [x, *params[i]], g, retain_graph=True)

        def step(i):
            torch.autograd.grad(copies[i](x), [x, *params[i]], g)

        bwd_us = median_us(backward, len(copies))
        both_us = median_us(step, len(copies))
        del ys
        rows.append({"kind": "backward", "dtype": "bf16", "n": n, "k": k, "m": m, "r": r,
                     "peft_backward_us": bwd_us, "peft_forward_backward_us": both_us})
        print(f"backward n {n:5} k {k:5} m {m:5} r {r:3}: PEFT backward {bwd_us:9.1f} us, "
              f"forward + backward {both_us:9.1f} us")


def multi_rows(shapes, batches, rows, deadline, r=16):
    for n, k in shapes:
        xs = torch.randn(max(t for t, _ in batches), k, device="cuda", dtype=DTYPE)
        for adapters in sorted({a for _, a in batches}):
            if time.monotonic() > deadline:
                return False
            copies = models(n, k, r, adapters)
            for model in copies:
                model.eval()
            for tokens, distinct in batches:
                if distinct != adapters:
                    continue
                if time.monotonic() > deadline:
                    return False
                x = xs[:tokens]
                # Tokens in contiguous groups, one per adapter, as the tour routes them.
                names = [f"a{t * distinct // tokens}" for t in range(tokens)]
                with torch.no_grad():
                    us = median_us(lambda i: copies[i](x, adapter_names=names), len(copies))
                rows.append({"kind": "multi", "dtype": "bf16", "n": n, "k": k, "m": tokens,
                             "adapters": distinct, "r": r, "peft_us": us})
                print(f"multi    n {n:5} k {k:5} tokens {tokens:4} adapters {distinct:3} r {r}: "
                      f"PEFT {us:9.1f} us")
            del copies
            torch.cuda.empty_cache()
    return True


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    out = args[0]
    budget = float(args[args.index("--budget") + 1]) if "--budget" in args else 120.0
    smoke = "--smoke" in args
    deadline = time.monotonic() + budget
    torch.manual_seed(0)
    import peft

    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "peft": peft.__version__, "warmup": WARMUP, "runs": RUNS, "rows": []}
    rows = report["rows"]
    if smoke:
        shapes, ms, ranks = [(72, 40)], [1, 17], [1, 16]
        batches = [(16, 8)]
    else:
        shapes, ms, ranks = [(4096, 4096), (14336, 4096)], [1, 16, 64, 512, 4096], [16, 64]
        batches = [(16, 8), (64, 8), (64, 64), (256, 64)]
    done = True
    for name, section in [
        ("forward", lambda: forward_rows(shapes, ms, ranks, rows, deadline)),
        ("multi", lambda: multi_rows(shapes, batches, rows, deadline)),
        ("backward", lambda: backward_rows(shapes, [m for m in ms if m >= 16], ranks, rows,
                                           deadline)),
    ]:
        try:
            done = section() and done
        except Exception as e:  # one section's failure still reports the others
            report.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
            print(f"{name}: failed: {type(e).__name__}: {e}")
    report["complete"] = done
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"peft-bench: {len(rows)} rows{'' if done else ' (time budget reached)'} -> {out}")


if __name__ == "__main__":
    main()
