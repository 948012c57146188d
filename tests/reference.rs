//! Property tests of the CPU reference against independent formulations of
//! the same math (docs/DESIGN.md section 1). f64 storage makes most of them exact
//! up to f64 rounding; the storage-type cases check the single final rounding.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::reference::{self, AdamW, AdamWState, Adapter, BackwardInputs, Gradients};
use lora_kernels::{Dims, Element, MergeOp};

/// Shapes: m may be 0, nothing is a multiple of a tile size by construction,
/// rank spans 1..=256.
fn shapes() -> impl Strategy<Value = (usize, usize, usize, usize, u64)> {
    (
        0usize..7,
        1usize..40,
        1usize..40,
        prop_oneof![Just(1usize), 1usize..=32, Just(256usize)],
        any::<u64>(),
    )
}

struct Case<T> {
    dims: Dims,
    x: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    rank: usize,
    scale: f32,
}

impl<T: Element> Case<T> {
    fn new((m, n, k, r, seed): (usize, usize, usize, usize, u64)) -> Self {
        let mut rng = rng(seed);
        Case {
            dims: Dims::new(m, n, k),
            x: random(&mut rng, m * k),
            w: random(&mut rng, n * k),
            a: random(&mut rng, r * k),
            b: random(&mut rng, n * r),
            rank: r,
            scale: 0.5 + (seed % 7) as f32 * 0.25,
        }
    }
    fn adapter(&self) -> Adapter<'_, T> {
        Adapter {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            scale: self.scale,
        }
    }
    fn forward(&self, adapter: &Adapter<'_, T>) -> Vec<T> {
        let mut y = vec![T::from_f64(f64::NAN); self.dims.m * self.dims.n];
        reference::fused_forward(self.dims, &self.x, &self.w, adapter, 0.0, &mut y).unwrap();
        y
    }
}

/// `x w^T` by the textbook triple loop, f64.
fn base_matmul<T: Element>(dims: Dims, x: &[T], w: &[T]) -> Vec<f64> {
    let Dims { m, n, k } = dims;
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for c in 0..n {
            for q in 0..k {
                y[i * n + c] += x[i * k + q].to_f64() * w[c * k + q].to_f64();
            }
        }
    }
    y
}

fn tol_f64() -> (f64, f64) {
    (1e-9, 1e-10)
}

proptest! {
    #![proptest_config(config(64))]

    /// fused = x (w + s b a)^T with the dense [n, k] update formed explicitly.
    #[test]
    fn fused_equals_dense_update(shape in shapes()) {
        let c = Case::<f64>::new(shape);
        let Dims { n, k, .. } = c.dims;
        let mut w_eff = c.w.clone();
        for row in 0..n {
            for q in 0..k {
                let ba: f64 = (0..c.rank).map(|j| c.b[row * c.rank + j] * c.a[j * k + q]).sum();
                w_eff[row * k + q] += c.scale as f64 * ba;
            }
        }
        let want = base_matmul(c.dims, &c.x, &w_eff);
        let (atol, rtol) = tol_f64();
        compare("fused vs dense", &c.forward(&c.adapter()), &want, atol, rtol).map_err(TestCaseError::fail)?;
    }

    /// With bf16 storage the result is the f64 value rounded once.
    #[test]
    fn fused_rounds_once(shape in shapes()) {
        let c = Case::<bf16>::new(shape);
        let wide = Case::<f64> {
            dims: c.dims,
            x: c.x.iter().map(|v| v.to_f64()).collect(),
            w: c.w.iter().map(|v| v.to_f64()).collect(),
            a: c.a.iter().map(|v| v.to_f64()).collect(),
            b: c.b.iter().map(|v| v.to_f64()).collect(),
            rank: c.rank,
            scale: c.scale,
        };
        let want: Vec<bf16> = wide.forward(&wide.adapter()).iter().map(|&v| bf16::from_f64(v)).collect();
        prop_assert_eq!(c.forward(&c.adapter()), want);
    }

    /// s = 0 gives exactly the base product; beta accumulates into y.
    #[test]
    fn zero_scale_is_base_and_beta_accumulates(shape in shapes(), beta in -2.0f32..2.0) {
        let c = Case::<f64>::new(shape);
        let zero = Adapter { scale: 0.0, ..c.adapter() };
        let (atol, rtol) = tol_f64();
        compare("s = 0", &c.forward(&zero), &base_matmul(c.dims, &c.x, &c.w), atol, rtol)
            .map_err(TestCaseError::fail)?;
        let mut y0 = random::<f64>(&mut rng(shape.4 ^ 1), c.dims.m * c.dims.n);
        let want: Vec<f64> = c.forward(&c.adapter()).iter().zip(&y0).map(|(f, y)| f + beta as f64 * y).collect();
        reference::fused_forward(c.dims, &c.x, &c.w, &c.adapter(), beta, &mut y0).unwrap();
        compare("beta", &y0, &want, atol, rtol).map_err(TestCaseError::fail)?;
    }

    /// Multi-adapter = per-token single-adapter calls; segments = per-token ids.
    #[test]
    fn multi_adapter_matches_per_token_loop(
        (m, n, k, _, seed) in shapes(),
        ranks in prop::collection::vec(prop_oneof![Just(1usize), 1usize..=20, Just(256usize)], 1..5),
    ) {
        let mut g = rng(seed);
        let dims = Dims::new(m, n, k);
        let x: Vec<f64> = random(&mut g, m * k);
        let w: Vec<f64> = random(&mut g, n * k);
        let weights: Vec<(Vec<f64>, Vec<f64>)> =
            ranks.iter().map(|&r| (random(&mut g, r * k), random(&mut g, n * r))).collect();
        let adapters: Vec<Adapter<'_, f64>> = weights.iter().zip(&ranks).enumerate()
            .map(|(i, ((a, b), &r))| Adapter { a, b, rank: r, scale: 0.25 + i as f32 })
            .collect();
        // Random ids with repeats and -1s, then sorted into segments.
        let mut ids: Vec<i32> = (0..m).map(|i| ((seed >> (i % 60)) as i32).rem_euclid(adapters.len() as i32 + 1) - 1).collect();
        let mut y = vec![f64::NAN; m * n];
        reference::multi_adapter_forward(dims, &x, &w, &adapters, &ids, 0.0, &mut y).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let row = Dims::new(1, n, k);
            let xi = &x[i * k..(i + 1) * k];
            let want = if id < 0 {
                base_matmul(row, xi, &w)
            } else {
                let mut yi = vec![f64::NAN; n];
                reference::fused_forward(row, xi, &w, &adapters[id as usize], 0.0, &mut yi).unwrap();
                yi
            };
            prop_assert_eq!(&y[i * n..(i + 1) * n], &want[..]);
        }
        ids.sort();
        let mut offsets = vec![0i32];
        let mut slots = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if slots.last() != Some(&id) {
                if i > 0 { offsets.push(i as i32); }
                slots.push(id);
            }
        }
        offsets.push(m as i32);
        if slots.is_empty() { offsets = vec![0, 0]; slots.push(-1); }
        let mut y_ids = vec![f64::NAN; m * n];
        reference::multi_adapter_forward(dims, &x, &w, &adapters, &ids, 0.0, &mut y_ids).unwrap();
        let mut y_seg = vec![f64::NAN; m * n];
        reference::multi_adapter_forward_segments(dims, &x, &w, &adapters, (&offsets, &slots), 0.0, &mut y_seg).unwrap();
        prop_assert_eq!(y_seg, y_ids);
    }

    /// Gradients = central finite differences of L = sum(g * y) (y is linear
    /// in each of x, a, b, so the difference quotient is exact up to rounding).
    #[test]
    fn gradients_match_finite_differences(
        (m, n, k, r, seed) in (1usize..5, 1usize..12, 1usize..12, 1usize..6, any::<u64>()),
        accumulate in any::<bool>(),
    ) {
        let c = Case::<f64>::new((m, n, k, r, seed));
        let g: Vec<f64> = random(&mut rng(seed ^ 7), m * n);
        let loss = |x: &[f64], a: &[f64], b: &[f64]| -> f64 {
            let ad = Adapter { a, b, rank: r, scale: c.scale };
            let mut y = vec![0.0; m * n];
            reference::fused_forward(c.dims, x, &c.w, &ad, 0.0, &mut y).unwrap();
            y.iter().zip(&g).map(|(y, g)| y * g).sum()
        };
        let fd = |which: usize, i: usize| -> f64 {
            let h = 1e-3;
            let mut args = [c.x.clone(), c.a.clone(), c.b.clone()];
            args[which][i] += h;
            let plus = loss(&args[0], &args[1], &args[2]);
            args[which][i] -= 2.0 * h;
            let minus = loss(&args[0], &args[1], &args[2]);
            (plus - minus) / (2.0 * h)
        };
        let t = reference::lora_intermediate(c.dims, &c.x, &c.adapter()).unwrap();
        let prior = if accumulate { 0.5 } else { 0.0 };
        let mut dx = vec![prior; m * k];
        let mut da = vec![prior as f32; r * k];
        let mut db = vec![prior as f32; n * r];
        let inputs = BackwardInputs { g: &g, x: &c.x, w: &c.w, adapter: c.adapter(), t: &t };
        reference::backward(c.dims, &inputs, Gradients {
            dx: Some(&mut dx), da: Some(&mut da), db: Some(&mut db), accumulate,
        }).unwrap();
        let want_dx: Vec<f64> = (0..m * k).map(|i| prior + fd(0, i)).collect();
        let want_da: Vec<f64> = (0..r * k).map(|i| prior + fd(1, i)).collect();
        let want_db: Vec<f64> = (0..n * r).map(|i| prior + fd(2, i)).collect();
        compare("dx", &dx, &want_dx, 1e-7, 1e-7).map_err(TestCaseError::fail)?;
        // da, db are f32 (and db uses the f32 intermediate t).
        let da64: Vec<f64> = da.iter().map(|&v| v as f64).collect();
        let db64: Vec<f64> = db.iter().map(|&v| v as f64).collect();
        compare("da", &da64, &want_da, 1e-5, 1e-6).map_err(TestCaseError::fail)?;
        compare("db", &db64, &want_db, 1e-5, 1e-6).map_err(TestCaseError::fail)?;
    }

    /// Merging then running the base product equals the fused forward.
    #[test]
    fn merge_then_base_equals_fused(shape in shapes()) {
        let c = Case::<f64>::new(shape);
        let mut merged = c.w.clone();
        reference::merge(c.dims.n, c.dims.k, &mut merged, &c.adapter(), MergeOp::Merge).unwrap();
        let (atol, rtol) = tol_f64();
        compare("merged base", &base_matmul(c.dims, &c.x, &merged), &c.forward(&c.adapter()), atol, rtol)
            .map_err(TestCaseError::fail)?;
    }

    /// unmerge(merge(w)) = w up to the rounding of the merged weight.
    #[test]
    fn unmerge_restores_within_one_rounding(shape in shapes()) {
        fn check<T: Element>(c: &Case<T>) -> Result<(), TestCaseError> {
            let Dims { n, k, .. } = c.dims;
            let mut w = c.w.clone();
            reference::merge(n, k, &mut w, &c.adapter(), MergeOp::Merge).unwrap();
            reference::merge(n, k, &mut w, &c.adapter(), MergeOp::Unmerge).unwrap();
            let u = T::UNIT_ROUNDOFF;
            for row in 0..n {
                for q in 0..k {
                    let d: f64 = c.scale as f64
                        * (0..c.rank).map(|j| c.b[row * c.rank + j].to_f64() * c.a[j * k + q].to_f64()).sum::<f64>();
                    let (orig, back) = (c.w[row * k + q].to_f64(), w[row * k + q].to_f64());
                    let bound = 2.0 * u * (orig.abs() + d.abs()) + 1e-300;
                    prop_assert!((back - orig).abs() <= bound,
                        "{:?} w[{row},{q}]: {orig} -> {back}, |diff| > {bound}", T::DTYPE);
                }
            }
            Ok(())
        }
        check(&Case::<f64>::new(shape))?;
        check(&Case::<f16>::new(shape))?;
        check(&Case::<bf16>::new(shape))?;
    }

    /// AdamW matches the textbook update written out step by step.
    #[test]
    fn adamw_matches_formula(len in 1usize..50, steps in 1u32..5, seed in any::<u64>(), wd in 0.0f32..0.1) {
        let cfg = AdamW { lr: 1e-2, weight_decay: wd, ..AdamW::default() };
        let mut g = rng(seed);
        let mut p: Vec<f32> = random(&mut g, len);
        let (mut m1, mut m2) = (vec![0f32; len], vec![0f32; len]);
        let mut working = vec![bf16::ZERO; len];
        let mut want: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        let (mut wm1, mut wm2) = (vec![0f64; len], vec![0f64; len]);
        for step in 1..=steps {
            let grad: Vec<f32> = random(&mut g, len);
            reference::adamw_step(&cfg, step, &grad, AdamWState { p: &mut p, m1: &mut m1, m2: &mut m2, working: &mut working }).unwrap();
            let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
            for i in 0..len {
                let gi = grad[i] as f64;
                wm1[i] = b1 * wm1[i] + (1.0 - b1) * gi;
                wm2[i] = b2 * wm2[i] + (1.0 - b2) * gi * gi;
                let mhat = wm1[i] / (1.0 - b1.powi(step as i32));
                let vhat = wm2[i] / (1.0 - b2.powi(step as i32));
                want[i] -= cfg.lr as f64 * (mhat / (vhat.sqrt() + cfg.eps as f64) + wd as f64 * want[i]);
            }
        }
        let got: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        compare("adamw p", &got, &want, 1e-6, 1e-5).map_err(TestCaseError::fail)?;
        for (wk, pv) in working.iter().zip(&p) {
            prop_assert_eq!(*wk, bf16::from_f32(*pv));
        }
    }
}

/// An empty batch is valid and touches nothing.
#[test]
fn empty_batch_is_ok() {
    let c = Case::<f32>::new((0, 5, 7, 3, 11));
    let mut y: Vec<f32> = Vec::new();
    reference::fused_forward(c.dims, &c.x, &c.w, &c.adapter(), 0.0, &mut y).unwrap();
    reference::multi_adapter_forward(c.dims, &c.x, &c.w, &[c.adapter()], &[], 0.0, &mut y).unwrap();
}

/// NaN and Inf in inputs propagate; beta = 0 never reads y.
#[test]
fn non_finite_inputs_propagate() {
    let mut c = Case::<f32>::new((3, 4, 5, 2, 5));
    c.x[0] = f32::NAN; // row 0 of y becomes NaN
    c.x[5] = f32::INFINITY; // row 1 of y: Inf or NaN
    let mut y = vec![f32::NAN; 12];
    reference::fused_forward(c.dims, &c.x, &c.w, &c.adapter(), 0.0, &mut y).unwrap();
    assert!(y[..4].iter().all(|v| v.is_nan()));
    assert!(y[4..8].iter().all(|v| !v.is_finite()));
    assert!(
        y[8..].iter().all(|v| v.is_finite()),
        "row 2 must not see y's old NaN: {y:?}"
    );
}
