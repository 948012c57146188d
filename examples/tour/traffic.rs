//! The tour's second static section: the bytes each operation's launch
//! moves by its tile plan against the least any kernel must move
//! (`lora_kernels::ops::traffic`), at the shapes the timed tables use.
use lora_kernels::ops::traffic::{self, Traffic};
use lora_kernels::{DType, Dims};

pub fn section(number: usize) {
    println!(
        "\n{number}. global-memory traffic by tile plan (static model: bytes the blocks read and write, \
         re-reads mostly from L2; floor: each operand once; no GPU needed)"
    );
    println!(
        "   {:<26} {:<34} {:>12} {:>10} {:>6}",
        "op", "shape", "requested MB", "floor MB", "ratio"
    );
    let (n, k) = (4096, 4096);
    for m in [1usize, 16, 64, 4096] {
        for r in [16usize, 64] {
            let t = traffic::fused_forward(DType::BF16, Dims::new(m, n, k), r, false);
            row(
                "fused forward bf16",
                format!("m {m}, n {n}, k {k}, r {r}"),
                t,
            );
        }
    }
    for (tokens, adapters) in [(1usize, 1usize), (64, 8), (64, 64), (256, 64), (4096, 16)] {
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
        row(
            "multi-adapter bf16",
            format!("{tokens} tokens, {adapters} adapters r 16"),
            t,
        );
    }
    let slots = 1000;
    let t = traffic::adamw_step(DType::BF16, slots * 16 * (n + k), false);
    row(
        "AdamW step bf16",
        format!("{slots} slots, r 16, n {n}, k {k}"),
        t,
    );
    println!(
        "   prefill is bound by its MMAs, not these bytes: x re-read per column tile and w per row tile          is a GEMM's tiling, served mostly by L2"
    );
    println!("   model: src/ops/traffic.rs");
}

fn row(op: &str, shape: String, t: Traffic) {
    println!(
        "   {op:<26} {shape:<34} {:>12.2} {:>10.2} {:>6.2}",
        t.requested as f64 / 1e6,
        t.floor as f64 / 1e6,
        t.ratio()
    );
}
