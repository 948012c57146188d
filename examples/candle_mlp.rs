//! A Llama-style MLP block, `down(silu(gate(x)) * up(x))`, with LoRA on all
//! three projections ([`LoraLinear`]), serving 8 users' adapters (mixed ranks)
//! and some base-only tokens in one batch, in bf16 on candle tensors.
//!
//! Each projection is checked against candle's own unfused computation of it
//! (`x w^T + s (x a^T) b^T`, user by user, in f64 from the same bf16 inputs)
//! with docs/DESIGN.md section 3's per-element bound, and so is a negative
//! control (one user's scale 1% off), which must fail. The whole block is then
//! compared with the same block computed unfused in bf16 by candle, as an
//! engine computes it without this crate.
//!
//! On candle's CPU device the kernels run on the host runtime (a small
//! configuration); built with `--features candle-cuda` on a GPU machine it
//! runs on the GPU at Llama-3-8B's MLP shapes and times both blocks.
//!
//!     cargo run --release --features candle --example candle_mlp
use std::time::Instant;

use candle_core::{D, DType, Device, Result, Tensor};
use half::bf16;
use lora_kernels::candle::LoraLinear;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const USERS: usize = 8;
/// Each user's rank: mixed, rank 1 included.
const RANKS: [usize; USERS] = [1, 4, 8, 16, 2, 16, 8, 4];
const MAX_RANK: usize = 16;

/// One projection: the layer, and each user's adapter as loaded (for the
/// unfused computation).
struct Projection {
    name: &'static str,
    layer: LoraLinear<bf16>,
    adapters: Vec<(Tensor, Tensor, f32)>,
}

fn main() -> Result<()> {
    let (dev, gpu) = pick_device()?;
    // (hidden, intermediate, tokens): Llama-3-8B's MLP on a GPU; small and
    // not a multiple of any tile on the host runtime.
    let (hidden, inter, m) = if gpu {
        (4096, 14336, 64)
    } else {
        (72, 136, 37)
    };
    println!(
        "candle_mlp on {}: hidden {hidden}, intermediate {inter}, {m} tokens, {USERS} users (ranks {RANKS:?}), bf16",
        if gpu {
            "the GPU (candle's CUDA device)"
        } else {
            "candle's CPU device: the kernels run on the host runtime (no GPU used)"
        }
    );

    let mut rng = StdRng::seed_from_u64(2026);
    let gate = projection(&mut rng, "gate", (inter, hidden), &dev)?;
    let up = projection(&mut rng, "up", (inter, hidden), &dev)?;
    let down = projection(&mut rng, "down", (hidden, inter), &dev)?;
    // Token i: user i % 9, where user 8 means no adapter (id -1).
    let ids: Vec<i32> = (0..m)
        .map(|i| if i % 9 == 8 { -1 } else { (i % 9) as i32 })
        .collect();
    let ids_t = Tensor::new(ids.as_slice(), &dev)?;
    let x = uniform(&mut rng, &[m, hidden], &dev)?;

    // The block with the fused kernels.
    let h_gate = gate.layer.forward(&x, &ids_t)?;
    let h_up = up.layer.forward(&x, &ids_t)?;
    let act = (candle_nn_silu(&h_gate)? * &h_up)?;
    let y = down.layer.forward(&act, &ids_t)?;

    // Each projection against candle's unfused computation of it, on the
    // same inputs, and its negative control.
    let mut ok = true;
    for (p, input, output) in [(&gate, &x, &h_gate), (&up, &x, &h_up), (&down, &act, &y)] {
        ok &= check_projection(p, input, output, &ids)?;
    }

    // The block as an engine computes it without this crate.
    let unfused_block = {
        let g = unfused_bf16(&gate, &x, &ids)?;
        let u = unfused_bf16(&up, &x, &ids)?;
        unfused_bf16(&down, &(candle_nn_silu(&g)? * u)?, &ids)?
    };
    let diff = relative_diff(&y, &unfused_block)?;
    println!(
        "block output vs candle's unfused bf16 block: normwise relative difference {diff:.2e} \
         (the unfused block rounds t and each partial product to bf16)"
    );

    if gpu {
        time_blocks(&gate, &up, &down, &x, &ids, &ids_t, &dev)?;
    } else {
        println!("timing: not measured (no GPU; the host runtime's speed means nothing)");
    }
    if !ok {
        return Err(candle_core::Error::Msg(
            "a projection failed its check".into(),
        ));
    }
    println!("all checks passed");
    Ok(())
}

/// candle's CUDA device 0 when built with `candle-cuda` and a GPU is there,
/// else the CPU.
fn pick_device() -> Result<(Device, bool)> {
    #[cfg(feature = "candle-cuda")]
    if let Ok(dev) = Device::new_cuda(0) {
        return Ok((dev, true));
    }
    Ok((Device::Cpu, false))
}

/// Uniform in [-1, 1) from a seeded generator, bf16: the design's test data
/// (never zeros), the same on every run and device.
fn uniform(rng: &mut StdRng, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let len = shape.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, dev)?.to_dtype(DType::BF16)
}

/// A projection `[n, k]` with a frozen random weight and every user's adapter
/// loaded in slot = user, scale between 0.25 and 2.5, so the low-rank term
/// is of the order of the base term.
fn projection(
    rng: &mut StdRng,
    name: &'static str,
    (n, k): (usize, usize),
    dev: &Device,
) -> Result<Projection> {
    let mut layer = LoraLinear::<bf16>::new(uniform(rng, &[n, k], dev)?, USERS, MAX_RANK)?;
    let mut adapters = Vec::new();
    for (user, &rank) in RANKS.iter().enumerate() {
        let (a, b) = (
            uniform(rng, &[rank, k], dev)?,
            uniform(rng, &[n, rank], dev)?,
        );
        let scale = 0.25 + 2.25 * user as f32 / (USERS - 1) as f32;
        layer.load_adapter(user, &a, &b, scale)?;
        adapters.push((a, b, scale));
    }
    Ok(Projection {
        name,
        layer,
        adapters,
    })
}

/// SiLU, `v * sigmoid(v)`, in candle's own ops.
fn candle_nn_silu(v: &Tensor) -> Result<Tensor> {
    v / (v.neg()?.exp()? + 1.0)?
}

/// The rows of tokens that use `user`, as a `[m, 1]` 0/1 mask of `dtype`.
fn mask(ids: &[i32], user: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = ids
        .iter()
        .map(|&i| (i == user as i32) as u8 as f32)
        .collect();
    Tensor::from_vec(v, (ids.len(), 1), dev)?.to_dtype(dtype)
}

/// Each user's adapter: `a`, `b`, scale.
type Adapters = [(Tensor, Tensor, f32)];

/// A projection computed unfused by candle in `dtype`: the base product `x
/// w^T`, plus each user's `s (x a^T) b^T` on that user's rows. With `abs`
/// every operand is replaced by its absolute value first, giving the sum of
/// |terms| behind each element.
fn unfused(
    (w, adapters): (&Tensor, &Adapters),
    x: &Tensor,
    ids: &[i32],
    dtype: DType,
    abs: bool,
) -> Result<Tensor> {
    let prep = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(dtype)?;
        if abs { t.abs() } else { Ok(t) }
    };
    let x = prep(x)?;
    let mut y = x.matmul(&prep(w)?.t()?)?;
    for (user, (a, b, scale)) in adapters.iter().enumerate() {
        let scale = if abs { scale.abs() } else { *scale };
        let t = (x.matmul(&prep(a)?.t()?)? * scale as f64)?;
        let low_rank = t.matmul(&prep(b)?.t()?)?;
        y = (y + low_rank.broadcast_mul(&mask(ids, user, dtype, x.device())?)?)?;
    }
    Ok(y)
}

/// The unfused projection in bf16, as an engine without this crate runs it.
fn unfused_bf16(p: &Projection, x: &Tensor, ids: &[i32]) -> Result<Tensor> {
    unfused((p.layer.weight(), &p.adapters), x, ids, DType::BF16, false)
}

/// Checks the kernel's `output` against the unfused f64 computation, rounded
/// once to bf16, with the bound `ulp_bf16(ref) + 4 eps_f32 A + 2^-15 S`
/// (docs/DESIGN.md section 3: A = the sum of |terms| behind the element, S =
/// its low-rank part, for `s t` crossing as a bf16 hi + lo pair); then the
/// same check with one user's scale 1% off, which must fail. Prints both;
/// true when both do what they must.
fn check_projection(p: &Projection, x: &Tensor, output: &Tensor, ids: &[i32]) -> Result<bool> {
    let w = p.layer.weight();
    let f64s = |t: Tensor| t.flatten_all()?.to_vec1::<f64>();
    let reference = |adapters: &Adapters| -> Result<Vec<f64>> {
        let want = unfused((w, adapters), x, ids, DType::F64, false)?;
        f64s(want.to_dtype(DType::BF16)?.to_dtype(DType::F64)?)
    };
    let terms = f64s(unfused((w, &p.adapters), x, ids, DType::F64, true)?)?;
    let no_adapters: &Adapters = &[];
    let base_terms = f64s(unfused((w, no_adapters), x, ids, DType::F64, true)?)?;
    let want = reference(&p.adapters)?;
    let bound: Vec<f64> = (want.iter().zip(&terms).zip(&base_terms))
        .map(|((&v, &all), &base)| {
            ulp_bf16(v) + 4.0 * f32::EPSILON as f64 * all + 2f64.powi(-15) * (all - base)
        })
        .collect();
    let got = f64s(output.to_dtype(DType::F64)?)?;
    let worst = worst_ratio(&got, &want, &bound);
    let passed = worst <= 1.0;

    // Negative control: user 1's scale 1% off.
    let mut off = p.adapters.clone();
    off[1].2 *= 1.01;
    let caught = worst_ratio(&got, &reference(&off)?, &bound) > 1.0;
    println!(
        "  {:<5} [{} x {}]: {} (worst |got - ref| / bound = {worst:.3}); 1%-off scale control {}",
        p.name,
        output.dim(0)?,
        output.dim(D::Minus1)?,
        if passed { "within bound" } else { "FAILED" },
        if caught { "caught" } else { "NOT caught" }
    );
    Ok(passed && caught)
}

/// bf16's unit in the last place at `v` (8 significant bits).
fn ulp_bf16(v: f64) -> f64 {
    if v == 0.0 {
        return 2f64.powi(-133);
    }
    2f64.powi(v.abs().log2().floor() as i32 - 7)
}

/// The largest `|got - want| / bound` over all elements; a NaN difference
/// counts as infinitely far.
fn worst_ratio(got: &[f64], want: &[f64], bound: &[f64]) -> f64 {
    (got.iter().zip(want).zip(bound))
        .map(|((g, w), b)| (g - w).abs() / b)
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .fold(f64::NEG_INFINITY, f64::max)
}

/// `||a - b|| / ||b||` in f64.
fn relative_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Times the fused block and candle's unfused bf16 block (median of 20 runs
/// after 3 warm-ups, the device synchronized around each run).
fn time_blocks(
    gate: &Projection,
    up: &Projection,
    down: &Projection,
    x: &Tensor,
    ids: &[i32],
    ids_t: &Tensor,
    dev: &Device,
) -> Result<()> {
    let fused = || -> Result<Tensor> {
        let act =
            (candle_nn_silu(&gate.layer.forward(x, ids_t)?)? * up.layer.forward(x, ids_t)?)?;
        down.layer.forward(&act, ids_t)
    };
    let unfused_block = || -> Result<Tensor> {
        let act = (candle_nn_silu(&unfused_bf16(gate, x, ids)?)? * unfused_bf16(up, x, ids)?)?;
        unfused_bf16(down, &act, ids)
    };
    let median = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let mut times = Vec::new();
        for run in 0..23 {
            dev.synchronize()?;
            let start = Instant::now();
            f()?;
            dev.synchronize()?;
            if run >= 3 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let (ours, theirs) = (median(&fused)?, median(&unfused_block)?);
    println!(
        "timing (wall clock around synchronized runs, median of 20): fused {ours:.3} ms, \
         candle unfused {theirs:.3} ms, ratio {:.2}",
        ours / theirs
    );
    Ok(())
}
