//! Serving a stream of requests from many adapters with a pool that has fewer
//! slots than there are adapters: each batch is planned by a `SlotMap` (least
//! recently used adapters are evicted), missing adapters are loaded, and one
//! fused multi-adapter launch serves the batch. Prints throughput, slot use,
//! evictions, and a check of served rows against the CPU reference.
//!
//!     cargo run --release --example serve
//!
//! On a GPU at hidden size 4096; without one, on the host runtime at a small
//! size (it says which).
mod common;

use std::time::Instant;

use half::bf16;
use lora_kernels::ops::multi_adapter_forward::{Routing, multi_adapter_forward};
use lora_kernels::reference::Adapter;
use lora_kernels::slot_map::SlotMap;
use lora_kernels::{AdapterPool, Dims, PoolConfig, reference};

struct Setup {
    hidden: usize,
    slots: usize,
    adapters: usize,
    batch: usize,
    batches: usize,
}

/// The weights of adapter `id` are a function of id.
fn values(len: usize, seed: u64) -> Vec<bf16> {
    common::values(len, seed, 1.0)
}

fn rank_of(id: usize) -> usize {
    [8, 16, 64, 16][id % 4]
}

fn adapter_weights(id: usize, n: usize, k: usize) -> (Vec<bf16>, Vec<bf16>) {
    let r = rank_of(id);
    (
        values(r * k, 1000 + id as u64),
        values(n * r, 5000 + id as u64),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dev, on_gpu) = common::pick_device();
    let setup = if on_gpu {
        Setup {
            hidden: 4096,
            slots: 32,
            adapters: 100,
            batch: 64,
            batches: 200,
        }
    } else {
        Setup {
            hidden: 64,
            slots: 4,
            adapters: 10,
            batch: 8,
            batches: 12,
        }
    };
    let Setup {
        hidden,
        slots,
        adapters,
        batch,
        batches,
    } = setup;
    let (n, k) = (hidden, hidden);
    println!(
        "serving on {}: hidden {hidden}, {adapters} adapters (ranks 8/16/64) through {slots} slots, {batches} batches of {batch} tokens",
        dev.name()
    );
    let mut pool = AdapterPool::<bf16>::new(
        &dev,
        PoolConfig {
            slots,
            max_rank: 64,
            n,
            k,
        },
    )?;
    pool.reserve_tokens(batch)?;
    let mut map = SlotMap::new(slots);
    let w_host = values(n * k, 7);
    let w = dev.upload(&w_host)?;
    let mut y = dev.zeros::<bf16>(batch * n)?;

    // Requests: popular adapters come often (a skewed draw), some tokens use none.
    let mut rng = 12345u64;
    let mut next = move |bound: usize| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) as usize) % bound
    };
    let (mut loads, mut evictions, mut served) = (0, 0, 0);
    let start = Instant::now();
    let mut last = None;
    for b in 0..batches {
        let distinct_cap = slots; // never more distinct adapters than slots in one batch
        let mut chosen: Vec<usize> = Vec::new();
        let tokens: Vec<Option<usize>> = (0..batch)
            .map(|_| {
                if next(10) == 0 {
                    return None;
                }
                let id = (next(adapters) * next(adapters)) / adapters; // skewed toward low ids
                if chosen.contains(&id) || chosen.len() < distinct_cap {
                    if !chosen.contains(&id) {
                        chosen.push(id);
                    }
                    Some(id)
                } else {
                    Some(chosen[next(chosen.len())])
                }
            })
            .collect();
        let plan = map.plan(&tokens)?;
        for &(id, slot) in &plan.loads {
            let (a, bw) = adapter_weights(id, n, k);
            pool.load(slot, &a, &bw, rank_of(id), 0.5)?;
        }
        loads += plan.loads.len();
        evictions += plan.evicted.len();
        let x_host = values(batch * k, 100 + b as u64);
        let x = dev.upload(&x_host)?;
        let ids = dev.upload(&plan.slot_ids)?;
        multi_adapter_forward(
            &pool,
            batch,
            &x,
            &w,
            &Routing::Tokens((&ids).into()),
            0.0,
            &mut y,
        )?;
        served += batch;
        if b + 1 == batches {
            last = Some((tokens, x_host));
        }
    }
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "served {served} tokens in {secs:.3} s ({:.0} tokens/s, adapter loads included): {loads} loads, {evictions} evictions, {}/{slots} slots in use, {:.1} KiB of adapter weights resident",
        served as f64 / secs,
        slots - pool.slots_free(),
        pool.bytes_used() as f64 / 1024.0
    );

    // Check the last batch against the reference, row by row (a sample on a GPU).
    let (tokens, x_host) = last.expect("at least one batch");
    let got = dev.download(&y)?;
    let rows: Vec<usize> = if batch <= 8 {
        (0..batch).collect()
    } else {
        vec![0, batch / 3, batch / 2, batch - 1]
    };
    let mut worst = 0f64;
    for row in rows {
        let xr = &x_host[row * k..(row + 1) * k];
        let mut want = vec![bf16::ZERO; n];
        let dims = Dims::new(1, n, k);
        match tokens[row] {
            None => {
                reference::multi_adapter_forward(dims, xr, &w_host, &[], &[-1], 0.0, &mut want)?
            }
            Some(id) => {
                let (a, b) = adapter_weights(id, n, k);
                let adapter = Adapter {
                    a: &a,
                    b: &b,
                    rank: rank_of(id),
                    scale: 0.5,
                };
                reference::fused_forward(dims, xr, &w_host, &adapter, 0.0, &mut want)?;
            }
        }
        let scale = want.iter().map(|v| v.to_f64().abs()).fold(1e-30, f64::max);
        for (g, w) in got[row * n..(row + 1) * n].iter().zip(&want) {
            worst = worst.max((g.to_f64() - w.to_f64()).abs() / scale);
        }
    }
    println!(
        "check of the last batch against the CPU reference: max |served - reference| / max |reference| = {worst:.2e} (bf16 output rounding is ~4e-3)"
    );
    if worst > 2e-2 {
        return Err(format!("served rows differ from the reference by {worst:.2e}").into());
    }
    Ok(())
}
