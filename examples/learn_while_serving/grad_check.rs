//! The model's backward (layers.rs by hand, the crate's kernels for the
//! projections) against candle's autograd of the same model with every
//! projection computed unfused, `x w^T + s (x a^T) b^T` per slot, from the
//! same adapters as variables. In f32, on a batch with three adapters (rank
//! 1 among them) and a base-only sequence, every adapter's `da` and `db`
//! must agree to a tolerance well under what a 0.01% change of one
//! adapter's scale moves them by, and that change (the negative control)
//! must be caught.
use candle_core::{D, Device, Result, Tensor, Var};

use crate::model::{Batch, Config, Model, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const CFG: Config = Config {
    vocab: 17,
    hidden: 16,
    heads: 4,
    kv_heads: 2,
    intermediate: 24,
    layers: 2,
    max_seq: 8,
    slots: 3,
    max_rank: 4,
};
/// (rank, scale) of slots 0, 1, 2.
const ADAPTERS: [(usize, f32); 3] = [(1, 1.5), (4, 0.75), (2, 2.0)];
/// Largest |kernels - autograd| over the largest |autograd| of any gradient.
const TOLERANCE: f32 = 2e-5;

/// Prints the comparison and says whether it passed (the control included).
pub fn run(dev: &Device) -> Result<bool> {
    let mut rng = StdRng::seed_from_u64(11);
    let mut model = Model::<f32>::new(CFG, dev, 5)?;
    let mut vars = Vec::new();
    for l in 0..CFG.layers {
        for p in 0..PROJECTIONS.len() {
            let (k, n) = CFG.shape(p);
            let path = Config::path(l, p);
            for (slot, &(rank, scale)) in ADAPTERS.iter().enumerate() {
                let a: Vec<f32> = (0..rank * k).map(|_| rng.random_range(-0.5..0.5)).collect();
                let b: Vec<f32> = (0..n * rank).map(|_| rng.random_range(-0.5..0.5)).collect();
                let pool = model
                    .adapters
                    .pool_mut(&path)
                    .expect("a pool per projection");
                pool.load(slot, &a, &b, rank, scale)
                    .map_err(candle_core::Error::wrap)?;
                let a = Var::from_vec(a, (rank, k), dev)?;
                let b = Var::from_vec(b, (n, rank), dev)?;
                vars.push(((l, p, slot), (a, b)));
            }
        }
    }
    let (seqs, seq) = (4, 5);
    let ids: Vec<i32> = [0, 1, -1, 2].iter().flat_map(|&i| [i; 5]).collect();
    let m = seqs * seq;
    let batch = Batch {
        tokens: (0..m)
            .map(|_| rng.random_range(0..CFG.vocab as u32))
            .collect(),
        ids,
        seqs,
        seq,
    };
    let targets: Vec<u32> = (0..m)
        .map(|_| rng.random_range(0..CFG.vocab as u32))
        .collect();
    let weights: Vec<f32> = (0..m).map(|_| rng.random_range(0.5..1.5)).collect();

    let tape = model.forward_train(&batch)?;
    let grads = model.backward(&tape, &targets, &weights)?;
    let ours = |l: usize, p: usize, slot: usize| -> Result<(Tensor, Tensor)> {
        let (da, db) = &grads[&Config::path(l, p)];
        let rank = ADAPTERS[slot].0;
        Ok((
            da.get(slot)?.narrow(0, 0, rank)?,
            db.get(slot)?.narrow(1, 0, rank)?,
        ))
    };

    let autograd = |scale_factor: f32| -> Result<f32> {
        let mut project = |l: usize, p: usize, x: &Tensor| -> Result<Tensor> {
            let mut y = x.matmul(&model.weight(l, p).t()?)?;
            for ((vl, vp, slot), (a, b)) in &vars {
                if (*vl, *vp) != (l, p) {
                    continue;
                }
                let mut scale = ADAPTERS[*slot].1;
                if *slot == 1 {
                    scale *= scale_factor;
                }
                let rows: Vec<f32> = batch
                    .ids
                    .iter()
                    .map(|&i| (i == *slot as i32) as u8 as f32)
                    .collect();
                let rows = Tensor::from_vec(rows, (m, 1), dev)?;
                let lora = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale as f64)?;
                y = (y + lora.broadcast_mul(&rows)?)?;
            }
            Ok(y)
        };
        let logits = model.run(&batch, &mut project)?.logits;
        let target_ids = Tensor::from_slice(&targets, (m, 1), dev)?;
        let losses =
            (logits.log_sum_exp(D::Minus1)? - logits.gather(&target_ids, 1)?.squeeze(1)?)?;
        let loss = (losses * Tensor::from_slice(&weights, m, dev)?)?.sum_all()?;
        let reference = loss.backward()?;
        let mut worst = 0f32;
        for ((l, p, slot), (a, b)) in &vars {
            let (da, db) = ours(*l, *p, *slot)?;
            for (got, var) in [(da, a), (db, b)] {
                let want = reference.get(var).expect("a gradient per variable");
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = want.abs()?.max_all()?.to_scalar::<f32>()?;
                worst = worst.max(err / size);
            }
        }
        Ok(worst)
    };
    let (err, control) = (autograd(1.0)?, autograd(1.0001)?);
    let passed = err <= TOLERANCE && control > TOLERANCE;
    println!(
        "backward vs candle autograd (f32; 2 layers, ranks 1, 4, 2 and base-only tokens): \
         worst relative error {err:.1e} (tolerance {TOLERANCE:.0e}); control with one scale \
         0.01% off: {control:.1e} ({}) -> {}",
        if control > TOLERANCE {
            "caught"
        } else {
            "NOT caught"
        },
        if passed { "pass" } else { "FAIL" }
    );
    Ok(passed)
}
