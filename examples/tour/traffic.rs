//! The tour's second static section: the bytes each operation's launch
//! moves by its tile plan against the least any kernel must move
//! (`lora_kernels::ops::traffic`), at the shapes the timed tables use.
use lora_kernels::ops::lora_backward::BackwardOptions;
use lora_kernels::ops::traffic::{self, Traffic};
use lora_kernels::{DType, Dims};

pub fn section(number: usize) {
    println!(
        "\n{number}. global-memory traffic by tile plan (static model: bytes the blocks read and write, \
         re-reads mostly from L2; floor: each operand once; no GPU needed)"
    );
    println!(
        "   {:<26} {:<46} {:>12} {:>10} {:>6}",
        "op", "shape", "requested MB", "floor MB", "ratio"
    );
    let (n, k) = (4096, 4096);
    for m in [1usize, 16, 64, 4096] {
        for r in [16usize, 64] {
            let t = traffic::fused_forward(DType::BF16, Dims::new(m, n, k), r, false);
            // Every row here computes t once, on the multi-adapter kernel
            // (ranks up to 64 at decode, and prefill).
            row(
                "fused forward bf16",
                format!("m {m}, n {n}, k {k}, r {r} (t once)"),
                t,
            );
        }
    }
    // A GQA k/v projection: 32 column tiles, split-K across 4 blocks each.
    for m in [1usize, 16] {
        let t = traffic::fused_forward(DType::BF16, Dims::new(m, 1024, k), 16, false);
        row(
            "fused forward bf16",
            format!("m {m}, n 1024, k {k}, r 16 (t once, split-K)"),
            t,
        );
    }
    // The same k/v projection served to many users: split-K again.
    let batches = [(1usize, 1usize), (64, 8), (64, 64), (256, 64), (4096, 16)];
    let kv = [(1, 1), (16, 16)];
    for (n, tokens, adapters) in batches
        .map(|(t, a)| (n, t, a))
        .into_iter()
        .chain(kv.map(|(t, a)| (1024, t, a)))
    {
        let ranks = vec![16; adapters];
        let ids: Vec<i32> = (0..tokens)
            .map(|i| (i * adapters / tokens) as i32)
            .collect();
        let t = traffic::multi_adapter_forward(
            DType::BF16,
            Dims::new(tokens, n, k),
            &ranks,
            &ids,
            false,
        );
        let split = if n == 1024 { ", n 1024 (split-K)" } else { "" };
        row(
            "multi-adapter bf16",
            format!("{tokens} tokens, {adapters} adapters r 16{split}"),
            t,
        );
    }
    backward_rows(n, k);
    let slots = 1000;
    for (from_stats, how) in [(false, "step"), (true, "step_pool_grads")] {
        let t = traffic::adamw_step(DType::BF16, slots * 16 * (n + k), false, from_stats);
        row(
            "AdamW step bf16",
            format!("{slots} slots, r 16, n {n}, k {k}, {how}"),
            t,
        );
    }
    row(
        "merge bf16",
        format!("n {n}, k {k}, r 16"),
        traffic::merge(DType::BF16, n, k, 16),
    );
    println!(
        "   prefill is bound by its MMAs, not these bytes: x (or g) re-read per column tile and w per row tile \
         is a GEMM's tiling, served mostly by L2"
    );
    println!(
        "   a pool's gradients hold every slot: those not trained are written as zeros (accumulate skips them)"
    );
    println!("   model: src/ops/traffic/");
}

/// The backward (dx, da, db) of one adapter, and of a pool's adapters as a
/// learn-while-serving step trains them, with its launches' shares.
fn backward_rows(n: usize, k: usize) {
    let deterministic = BackwardOptions {
        accumulate: false,
        deterministic: true,
        ..Default::default()
    };
    let mut cases: Vec<(String, Dims, Vec<usize>, Vec<i32>)> = Vec::new();
    for m in [16usize, 64, 4096] {
        for r in [16usize, 64] {
            cases.push((
                format!("m {m}, one adapter r {r}"),
                Dims::new(m, n, k),
                vec![r],
                Vec::new(),
            ));
        }
    }
    for (tokens, slots) in [(256usize, 256usize), (64, 1000)] {
        let ids = (0..tokens).map(|i| (i % slots) as i32).collect();
        cases.push((
            format!("{tokens} tokens, pool of {slots} r 16"),
            Dims::new(tokens, n, k),
            vec![16; slots],
            ids,
        ));
    }
    for (shape, dims, ranks, ids) in cases {
        let max_rank = ranks.iter().copied().max().unwrap_or(0);
        let ids = (!ids.is_empty()).then_some(ids.as_slice());
        let Some(t) =
            traffic::lora_backward(DType::BF16, dims, &ranks, max_rank, ids, deterministic)
        else {
            continue;
        };
        row("backward bf16 (determ.)", shape, t.total);
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "   {:<26} of which u {:.1}, dx {:.1}, db {:.1}, da {:.1} MB",
            "",
            mb(t.u),
            mb(t.dx),
            mb(t.db),
            mb(t.da)
        );
    }
}

fn row(op: &str, shape: String, t: Traffic) {
    println!(
        "   {op:<26} {shape:<46} {:>12.2} {:>10.2} {:>6.2}",
        t.requested as f64 / 1e6,
        t.floor as f64 / 1e6,
        t.ratio()
    );
}
