//! The crate's ops on candle tensors (feature `candle`) on candle's Cpu device,
//! which runs them on the host runtime: each op against the CPU reference
//! under docs/DESIGN.md section 3's per-element bound with a negative control
//! per op and type, leading dims, strided and empty inputs, U32 ids, NaN
//! isolation between tokens, and errors that name the operand.
mod common;

use candle_core::{DType as CandleDType, Device as CandleDevice, Tensor, Var};
use common::pool_model::PoolCase;
use common::*;
use half::{bf16, f16};
use lora_kernels::candle::CandleElement;
use lora_kernels::candle::fused_forward::{
    fused_forward, fused_forward_autograd, fused_forward_saving_t,
};
use lora_kernels::candle::lora_backward::{
    BackwardRequest, TensorGrads, lora_backward, multi_adapter_backward,
    multi_adapter_backward_into,
};
use lora_kernels::candle::multi_adapter_forward::{
    multi_adapter_forward, multi_adapter_forward_saving_t,
};
use lora_kernels::ops::lora_backward::BackwardScratch;
use lora_kernels::reference;
use lora_kernels::{AdapterPool, Dims, Element, PoolConfig, PoolGrads};

const CPU: CandleDevice = CandleDevice::Cpu;

/// (n, k) of every case: neither a multiple of any tile.
const N: usize = 19;
const K: usize = 40;

/// A tensor of `shape` on the Cpu device holding `v`.
fn tensor<T: candle_core::WithDType>(v: &[T], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &CPU).unwrap()
}

/// A tensor's elements in row-major order.
fn values<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The crate's view of an element (candle's `WithDType` has the same names).
fn f64_of<T: Element>(v: T) -> f64 {
    v.to_f64()
}

fn dtype_of<T: Element>() -> lora_kernels::DType {
    T::DTYPE
}

/// The bits of every element (as f64) of an output: `T` (y, dx) or f32
/// (t, da, db).
fn bits<T: CandleElement>(t: &Tensor) -> Vec<u64> {
    let values: Vec<f64> = match t.dtype() {
        CandleDType::F32 => values::<f32>(t).into_iter().map(f64::from).collect(),
        _ => values::<T>(t).into_iter().map(f64_of).collect(),
    };
    values.into_iter().map(f64::to_bits).collect()
}

/// A pool case whose slot `s` has scale `sqrt(3 / rank) (1 + s / 4)`: with
/// uniform data the low-rank term `s sqrt(r / 3)` times the base term is
/// then about as large as the base term, so a wrong scale shows.
fn pool_case<T: CandleElement>(m: usize, ranks: &[usize], ids: Vec<i32>, seed: u64) -> PoolCase<T> {
    let max_rank = ranks.iter().copied().max().unwrap();
    let mut case = PoolCase::new(Dims::new(m, N, K), max_rank, ranks, ids, seed);
    for (s, (rank, scale, _, _)) in case.slots.iter_mut().enumerate() {
        *scale = (3.0 / (*rank).max(1) as f32).sqrt() * (1.0 + s as f32 / 4.0);
    }
    case
}

/// A single adapter of `rank` used by every token: slot 0 of a one-slot pool.
fn single<T: CandleElement>(m: usize, rank: usize, seed: u64) -> PoolCase<T> {
    pool_case(m, &[rank], vec![0; m], seed)
}

/// Ranks of the mixed pool (slot 1 empty) and ids with repeats, `-1` and an
/// out-of-range id (7).
const MIXED: [usize; 4] = [5, 0, 1, 12];
fn mixed_ids(m: usize) -> Vec<i32> {
    (0..m).map(|i| [0, 3, -1, 2, 3, 1, 7][i % 7]).collect()
}

/// The case's tensors.
struct Tensors {
    g: Tensor,
    x: Tensor,
    w: Tensor,
    t: Tensor,
    ids: Tensor,
}

fn tensors<T: CandleElement>(case: &PoolCase<T>) -> Tensors {
    let Dims { m, n, k } = case.dims;
    Tensors {
        g: tensor(&case.g, &[m, n]),
        x: tensor(&case.x, &[m, k]),
        w: tensor(&case.w, &[n, k]),
        t: tensor(&case.t, &[m, case.max_rank]),
        ids: tensor(&case.ids, &[m]),
    }
}

/// The adapter of slot 0 (of a single-adapter case) as tensors: a, b, scale.
fn adapter_tensors<T: CandleElement>(case: &PoolCase<T>) -> (Tensor, Tensor, f32) {
    let (rank, scale, a, b) = &case.slots[0];
    (tensor(a, &[*rank, K]), tensor(b, &[N, *rank]), *scale)
}

/// The case's pool on the Cpu device's host runtime.
fn pool<T: CandleElement>(case: &PoolCase<T>) -> AdapterPool<T> {
    case.pool(&lora_kernels::candle::device(&CPU).unwrap())
}

/// `y` against the reference under the model's per-element bound: the
/// single-adapter reference (`reference::fused_forward`) when `single`, the
/// pool's otherwise.
fn check_y<T: CandleElement>(
    what: &str,
    case: &PoolCase<T>,
    single: bool,
    y: &[T],
) -> Result<(), String> {
    let want = if single {
        let Dims { m, n, .. } = case.dims;
        let mut want = vec![<T as Element>::from_f64(f64::NAN); m * n];
        let ad = case.adapter_of(0).expect("every token uses slot 0");
        reference::fused_forward(case.dims, &case.x, &case.w, &ad, 0.0, &mut want).unwrap();
        want
    } else {
        case.expected_y()
    };
    compare_within(what, y, &want, &case.y_bounds(&want))
}

/// `y` checked, and its negative control: against the reference with every
/// scale off by `off`, the same check must fail.
fn check_y_with_control<T: CandleElement>(
    what: &str,
    case: &PoolCase<T>,
    single: bool,
    y: &[T],
    off: f32,
) {
    check_y(what, case, single, y).unwrap();
    let err = check_y(what, &case.with_scales_times(1.0 + off), single, y)
        .expect_err("a reference with the scale off must fail the check");
    eprintln!("negative control {what}, scale x (1 + {off}): {err}");
}

/// `t` (`[m, max_rank]`) against the model's, under its per-element bound.
fn check_t<T: CandleElement>(what: &str, case: &PoolCase<T>, t: &Tensor) {
    assert_eq!(t.dims(), [case.dims.m, case.max_rank], "{what}");
    compare_within(what, &values::<f32>(t), &case.t, &case.t_bounds()).unwrap();
}

/// The gradients against the case's reference under its per-element bounds;
/// with `off`, also the negative control: against the reference with the
/// scales off by `off`, each gradient's check must fail.
fn check_grads<T: CandleElement>(
    what: &str,
    case: &PoolCase<T>,
    got: &TensorGrads,
    off: Option<f32>,
) {
    let check = |case: &PoolCase<T>| -> [Result<(), String>; 3] {
        let want = case.expected();
        let (bdx, bda, bdb) = case.bounds(&want);
        fn grad(t: &Option<Tensor>) -> &Tensor {
            t.as_ref().expect("asked for")
        }
        [
            compare_within(
                &format!("dx {what}"),
                &values::<T>(grad(&got.dx)),
                &want.0,
                &bdx,
            ),
            compare_within(
                &format!("da {what}"),
                &values::<f32>(grad(&got.da)),
                &want.1,
                &bda,
            ),
            compare_within(
                &format!("db {what}"),
                &values::<f32>(grad(&got.db)),
                &want.2,
                &bdb,
            ),
        ]
    };
    for result in check(case) {
        result.unwrap();
    }
    if let Some(off) = off {
        for (name, result) in ["dx", "da", "db"]
            .iter()
            .zip(check(&case.with_scales_times(1.0 + off)))
        {
            let err = result.expect_err("a reference with the scale off must fail the check");
            eprintln!("negative control {name} {what}, scale x (1 + {off}): {err}");
        }
    }
}

/// The relative scale errors the negative controls must catch (1% bf16,
/// 0.3% f16, 0.01% f32: docs/DESIGN.md section 3).
fn control_off<T: CandleElement>() -> f32 {
    match dtype_of::<T>() {
        lora_kernels::DType::BF16 => 1e-2,
        lora_kernels::DType::F16 => 3e-3,
        _ => 1e-4,
    }
}

fn single_adapter_forward_matches_reference<T: CandleElement>() {
    for (m, rank, seed) in [(5, 1, 1), (37, 12, 2)] {
        let case = single::<T>(m, rank, seed);
        let (ts, (a, b, scale)) = (tensors(&case), adapter_tensors(&case));
        let what = format!("fused_forward {:?} m={m} r={rank}", dtype_of::<T>());
        let y = fused_forward::<T>(&ts.x, &ts.w, &a, &b, scale).unwrap();
        assert_eq!(y.dims(), [m, N]);
        check_y_with_control(&what, &case, true, &values::<T>(&y), control_off::<T>());
        let (y, t) = fused_forward_saving_t::<T>(&ts.x, &ts.w, &a, &b, scale).unwrap();
        let what = format!("{what} saving t");
        check_y_with_control(&what, &case, true, &values::<T>(&y), control_off::<T>());
        check_t(&what, &case, &t);
    }
}

#[test]
fn fused_forward_matches_reference() {
    single_adapter_forward_matches_reference::<f32>();
    single_adapter_forward_matches_reference::<f16>();
    single_adapter_forward_matches_reference::<bf16>();
}

fn pool_forward_matches_reference<T: CandleElement>() {
    for (m, seed) in [(5, 3), (37, 4)] {
        let case = pool_case::<T>(m, &MIXED, mixed_ids(m), seed);
        let (ts, pool) = (tensors(&case), pool(&case));
        let what = format!("multi_adapter_forward {:?} m={m}", dtype_of::<T>());
        let y = multi_adapter_forward(&pool, &ts.x, &ts.w, &ts.ids).unwrap();
        assert_eq!(y.dims(), [m, N]);
        check_y_with_control(&what, &case, false, &values::<T>(&y), control_off::<T>());
        let (y, t) = multi_adapter_forward_saving_t(&pool, &ts.x, &ts.w, &ts.ids).unwrap();
        let what = format!("{what} saving t");
        check_y_with_control(&what, &case, false, &values::<T>(&y), control_off::<T>());
        check_t(&what, &case, &t);
    }
}

#[test]
fn multi_adapter_forward_matches_reference() {
    pool_forward_matches_reference::<f32>();
    pool_forward_matches_reference::<f16>();
    pool_forward_matches_reference::<bf16>();
}

fn single_adapter_backward_matches_reference<T: CandleElement>() {
    for (m, rank, seed, deterministic) in [(5, 1, 5, false), (37, 12, 6, true)] {
        let case = single::<T>(m, rank, seed);
        let (ts, (a, b, scale)) = (tensors(&case), adapter_tensors(&case));
        let req = BackwardRequest {
            deterministic,
            ..Default::default()
        };
        let grads = lora_backward::<T>(&ts.g, &ts.x, &ts.w, &ts.t, &a, &b, scale, req).unwrap();
        assert_eq!(grads.dx.as_ref().unwrap().dims(), [m, K]);
        assert_eq!(grads.da.as_ref().unwrap().dims(), [rank, K]);
        assert_eq!(grads.db.as_ref().unwrap().dims(), [N, rank]);
        let what = format!("lora_backward {:?} m={m} r={rank} {req:?}", dtype_of::<T>());
        check_grads(&what, &case, &grads, Some(control_off::<T>()));
    }
}

#[test]
fn lora_backward_matches_reference() {
    single_adapter_backward_matches_reference::<f32>();
    single_adapter_backward_matches_reference::<f16>();
    single_adapter_backward_matches_reference::<bf16>();
}

/// `fused_forward_autograd` in candle's graph: `y` has `fused_forward`'s
/// bits, and candle's backward of `sum(y * g)` (so `dL/dy = g` exactly)
/// gives `lora_backward`'s `dx`, and its `da`, `db` rounded to `T`, bit for
/// bit (both are checked against the reference above).
fn autograd_matches_the_functions<T: CandleElement>() {
    for (m, rank, seed) in [(5, 1, 7), (37, 12, 8)] {
        let case = single::<T>(m, rank, seed);
        let (ts, (a, b, scale)) = (tensors(&case), adapter_tensors(&case));
        let var = |t: &Tensor| Var::from_tensor(t).unwrap();
        let (x_var, a_var, b_var) = (var(&ts.x), var(&a), var(&b));
        let y = fused_forward_autograd::<T>(&x_var, &ts.w, &a_var, &b_var, scale).unwrap();
        let (want_y, t) = fused_forward_saving_t::<T>(&ts.x, &ts.w, &a, &b, scale).unwrap();
        let what = format!("autograd {:?} m={m} r={rank}", dtype_of::<T>());
        assert_eq!(bits::<T>(&y), bits::<T>(&want_y), "{what}: y");

        let loss = (&y * &ts.g).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let req = BackwardRequest::default();
        let want = lora_backward::<T>(&ts.g, &ts.x, &ts.w, &t, &a, &b, scale, req).unwrap();
        let rounded = |g: &Option<Tensor>| g.as_ref().unwrap().to_dtype(ts.x.dtype()).unwrap();
        for (name, var, want) in [
            ("dx", &x_var, rounded(&want.dx)),
            ("da", &a_var, rounded(&want.da)),
            ("db", &b_var, rounded(&want.db)),
        ] {
            let got = grads
                .get(var)
                .unwrap_or_else(|| panic!("{what}: no {name}"));
            assert_eq!(bits::<T>(got), bits::<T>(&want), "{what}: {name}");
        }
    }
}

#[test]
fn autograd_forward_gives_the_functions_gradients() {
    autograd_matches_the_functions::<f32>();
    autograd_matches_the_functions::<f16>();
    autograd_matches_the_functions::<bf16>();
}

fn pool_backward_matches_reference<T: CandleElement>() {
    for (m, seed, deterministic) in [(5, 7, true), (37, 8, false)] {
        let case = pool_case::<T>(m, &MIXED, mixed_ids(m), seed);
        let (ts, pool) = (tensors(&case), pool(&case));
        let req = BackwardRequest {
            deterministic,
            ..Default::default()
        };
        let grads =
            multi_adapter_backward(&pool, &ts.g, &ts.x, &ts.w, &ts.t, &ts.ids, req).unwrap();
        let (slots, mr) = (MIXED.len(), case.max_rank);
        assert_eq!(grads.da.as_ref().unwrap().dims(), [slots, mr, K]);
        assert_eq!(grads.db.as_ref().unwrap().dims(), [slots, N, mr]);
        let what = format!("multi_adapter_backward {:?} m={m} {req:?}", dtype_of::<T>());
        check_grads(&what, &case, &grads, Some(control_off::<T>()));
    }
}

#[test]
fn multi_adapter_backward_matches_reference() {
    pool_backward_matches_reference::<f32>();
    pool_backward_matches_reference::<f16>();
    pool_backward_matches_reference::<bf16>();
}

/// Into a `PoolGrads`: the same `dx`, `da` and `db` bit for bit as the
/// tensors (deterministic), with statistics the step can read; another
/// pool's gradients are refused.
#[test]
fn multi_adapter_backward_into_gives_the_same_gradients() {
    fn check<T: CandleElement>() {
        let case = pool_case::<T>(37, &MIXED, mixed_ids(37), 10);
        let (ts, pool) = (tensors(&case), pool(&case));
        let req = BackwardRequest {
            deterministic: true,
            ..Default::default()
        };
        let want = multi_adapter_backward(&pool, &ts.g, &ts.x, &ts.w, &ts.t, &ts.ids, req).unwrap();
        let mut grads = PoolGrads::new(&pool).unwrap();
        let mut scratch = BackwardScratch::new(pool.device()).unwrap();
        let inputs = (&ts.g, &ts.x, &ts.w, &ts.t);
        let dx = multi_adapter_backward_into(&pool, inputs, &ts.ids, &mut grads, req, &mut scratch)
            .unwrap();
        let what = format!("{:?}", dtype_of::<T>());
        assert_eq!(
            bits::<T>(&dx.unwrap()),
            bits::<T>(&want.dx.unwrap()),
            "{what}: dx"
        );
        let dev = pool.device();
        let host = |b| dev.download(b).unwrap();
        assert_eq!(
            host(grads.da()),
            values::<f32>(&want.da.unwrap()),
            "{what}: da"
        );
        assert_eq!(
            host(grads.db()),
            values::<f32>(&want.db.unwrap()),
            "{what}: db"
        );
        assert!(grads.has_stats(&pool), "{what}");

        let no_dx = BackwardRequest { dx: false, ..req };
        let dx =
            multi_adapter_backward_into(&pool, inputs, &ts.ids, &mut grads, no_dx, &mut scratch);
        assert!(dx.unwrap().is_none(), "{what}");
        let other = pool_case::<T>(37, &MIXED, mixed_ids(37), 10);
        let err = multi_adapter_backward_into(
            &self::pool(&other),
            inputs,
            &ts.ids,
            &mut grads,
            req,
            &mut scratch,
        )
        .unwrap_err();
        assert!(err.to_string().contains("grads"), "{what}: {err}");
    }
    check::<f32>();
    check::<f16>();
    check::<bf16>();
}

/// Only the gradients asked for come back.
#[test]
fn backward_returns_only_what_was_asked() {
    let case = single::<bf16>(5, 3, 9);
    let (ts, (a, b, scale)) = (tensors(&case), adapter_tensors(&case));
    let want = case.expected();
    let (bdx, bda, bdb) = case.bounds(&want);
    for which in [
        [true, false, false],
        [false, true, false],
        [false, false, true],
    ] {
        let req = BackwardRequest {
            dx: which[0],
            da: which[1],
            db: which[2],
            deterministic: false,
        };
        let got = lora_backward::<bf16>(&ts.g, &ts.x, &ts.w, &ts.t, &a, &b, scale, req).unwrap();
        assert_eq!(
            [got.dx.is_some(), got.da.is_some(), got.db.is_some()],
            which
        );
        if let Some(dx) = got.dx {
            compare_within("dx", &values::<bf16>(&dx), &want.0, &bdx).unwrap();
        }
        if let Some(da) = got.da {
            compare_within("da", &values::<f32>(&da), &want.1, &bda).unwrap();
        }
        if let Some(db) = got.db {
            compare_within("db", &values::<f32>(&db), &want.2, &bdb).unwrap();
        }
    }
}

/// Every op's outputs for one set of inputs.
struct Outputs {
    /// fused_forward_saving_t's, fused_forward's, multi_adapter_forward_saving_t's
    /// and multi_adapter_forward's y.
    y: [Tensor; 4],
    /// fused_forward_saving_t's and multi_adapter_forward_saving_t's t.
    t: [Tensor; 2],
    /// lora_backward's and multi_adapter_backward's (dx, da, db).
    grads: [[Tensor; 3]; 2],
}

impl Outputs {
    fn all(&self) -> impl Iterator<Item = &Tensor> {
        self.y
            .iter()
            .chain(&self.t)
            .chain(self.grads.iter().flatten())
    }
}

/// Runs every op on `x` (any shape `[..., K]`), `g` (`[..., N]`), `ids` and
/// the case's other operands (the single adapter: the pool's slot 0).
fn run_all<T: CandleElement>(
    case: &PoolCase<T>,
    pool: &AdapterPool<T>,
    (x, g, ids): (&Tensor, &Tensor, &Tensor),
) -> Outputs {
    let ts = tensors(case);
    let (a, b, scale) = adapter_tensors(case);
    let t_single = ts.t.narrow(1, 0, case.slots[0].0).unwrap();
    let req = BackwardRequest::default();
    let (y1, t1) = fused_forward_saving_t::<T>(x, &ts.w, &a, &b, scale).unwrap();
    let y2 = fused_forward::<T>(x, &ts.w, &a, &b, scale).unwrap();
    let g1 = lora_backward::<T>(g, x, &ts.w, &t_single, &a, &b, scale, req).unwrap();
    let (y3, t3) = multi_adapter_forward_saving_t(pool, x, &ts.w, ids).unwrap();
    let y4 = multi_adapter_forward(pool, x, &ts.w, ids).unwrap();
    let g2 = multi_adapter_backward(pool, g, x, &ts.w, &ts.t, ids, req).unwrap();
    let grads = |g: TensorGrads| [g.dx, g.da, g.db].map(|t| t.expect("all were asked for"));
    Outputs {
        y: [y1, y2, y3, y4],
        t: [t1, t3],
        grads: [grads(g1), grads(g2)],
    }
}

/// The same bits, element by element (`T` for y and dx, f32 for t, da, db).
fn assert_same_bits<T: CandleElement>(what: &str, got: &Outputs, want: &Outputs) {
    for (i, (g, w)) in got.all().zip(want.all()).enumerate() {
        assert_eq!(g.elem_count(), w.elem_count(), "{what}: output {i}");
        assert!(bits::<T>(g) == bits::<T>(w), "{what}: output {i} differs");
    }
}

/// x `[2, 3, k]` (ids `[2, 3]` or `[6]`) gives y and dx with the leading
/// dims, equal to the 2-D call; a strided x (the transpose of a `[k, m]`
/// tensor) and strided g and ids give the same bits as contiguous ones.
#[test]
fn leading_dims_and_strided_operands_give_the_2d_results() {
    let case = pool_case::<bf16>(6, &MIXED, mixed_ids(6), 11);
    let (ts, pool) = (tensors(&case), pool(&case));
    let flat = run_all(&case, &pool, (&ts.x, &ts.g, &ts.ids));

    let x3 = ts.x.reshape((2, 3, K)).unwrap();
    let g3 = ts.g.reshape((2, 3, N)).unwrap();
    for ids in [ts.ids.reshape((2, 3)).unwrap(), ts.ids.clone()] {
        let out = run_all(&case, &pool, (&x3, &g3, &ids));
        for y in &out.y {
            assert_eq!(y.dims(), [2, 3, N]);
        }
        for [dx, _, _] in &out.grads {
            assert_eq!(dx.dims(), [2, 3, K]);
        }
        assert_same_bits::<bf16>("3-D x", &out, &flat);
    }

    let transposed = |v: &Tensor| tensor(&values::<bf16>(&v.t().unwrap()), &[v.dim(1).unwrap(), 6]);
    let (x_strided, g_strided) = (
        transposed(&ts.x).t().unwrap(),
        transposed(&ts.g).t().unwrap(),
    );
    assert!(!x_strided.is_contiguous() && !g_strided.is_contiguous());
    // Column 1 of a [6, 2] tensor: every other element.
    let pairs: Vec<i32> = case.ids.iter().flat_map(|&id| [-1, id]).collect();
    let ids2 = tensor(&pairs, &[6, 2]);
    let ids_strided = ids2.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
    assert!(!ids_strided.is_contiguous());
    let out = run_all(&case, &pool, (&x_strided, &g_strided, &ids_strided));
    assert_same_bits::<bf16>("strided x", &out, &flat);
}

/// An empty batch (m = 0) gives empty outputs (y `[0, n]`, t `[0, rank]`,
/// dx `[0, k]`) and zero adapter gradients.
#[test]
fn empty_batch_gives_empty_outputs() {
    let case = pool_case::<f16>(0, &MIXED, vec![], 12);
    let (ts, pool) = (tensors(&case), pool(&case));
    let out = run_all(&case, &pool, (&ts.x, &ts.g, &ts.ids));
    let (r, mr, slots) = (MIXED[0], case.max_rank, MIXED.len());
    for y in &out.y {
        assert_eq!(y.dims(), [0, N]);
    }
    assert_eq!(out.t[0].dims(), [0, r]);
    assert_eq!(out.t[1].dims(), [0, mr]);
    let [[dx1, da1, db1], [dx2, da2, db2]] = &out.grads;
    assert_eq!(
        (dx1.dims(), dx2.dims()),
        ([0, K].as_slice(), [0, K].as_slice())
    );
    assert_eq!(
        (da1.dims(), db1.dims()),
        ([r, K].as_slice(), [N, r].as_slice())
    );
    assert_eq!(da2.dims(), [slots, mr, K]);
    assert_eq!(db2.dims(), [slots, N, mr]);
    for grad in [da1, db1, da2, db2] {
        assert!(values::<f32>(grad).iter().all(|&v| v == 0.0));
    }
}

/// Checks that `result` is an error whose message names `operand`.
fn assert_names<R>(operand: &str, what: &str, result: candle_core::Result<R>) {
    match result {
        Ok(_) => panic!("{what}: expected an error naming `{operand}`"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("`{operand}`")),
                "{what}: the error does not name `{operand}`: {msg}"
            );
        }
    }
}

fn zeros(shape: &[usize], dtype: CandleDType) -> Tensor {
    Tensor::zeros(shape, dtype, &CPU).unwrap()
}

/// Bad input to the single-adapter ops: wrong dtypes, wrong shapes of each
/// operand, a rank above MAX_RANK, a scalar x. Each is an error naming the
/// operand (never a panic).
#[test]
fn bad_single_adapter_input_is_an_error_naming_the_operand() {
    use CandleDType::{F16, F32};
    let case = single::<f32>(5, 3, 13);
    let (ts, (a, b, s)) = (tensors(&case), adapter_tensors(&case));
    let ff = |x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor| fused_forward::<f32>(x, w, a, b, s);
    let ft = |x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor| {
        fused_forward_saving_t::<f32>(x, w, a, b, s)
    };
    let bw = |g: &Tensor, x: &Tensor, t: &Tensor, a: &Tensor, b: &Tensor| {
        lora_backward::<f32>(g, x, &ts.w, t, a, b, s, BackwardRequest::default())
    };
    let (x, w, g, t) = (&ts.x, &ts.w, &ts.g, &ts.t);
    assert_names("x", "f16 x", ff(&zeros(&[5, K], F16), w, &a, &b));
    assert_names("w", "f16 w", ff(x, &zeros(&[N, K], F16), &a, &b));
    assert_names("b", "f16 b", ft(x, w, &a, &zeros(&[N, 3], F16)));
    assert_names("w", "w [n, k + 1]", ff(x, &zeros(&[N, K + 1], F32), &a, &b));
    assert_names("w", "3-D w", ff(x, &zeros(&[1, N, K], F32), &a, &b));
    assert_names("a", "a [r, k + 1]", ff(x, w, &zeros(&[3, K + 1], F32), &b));
    assert_names("b", "b [n + 1, r]", ft(x, w, &a, &zeros(&[N + 1, 3], F32)));
    let (a257, b257) = (zeros(&[257, K], F32), zeros(&[N, 257], F32));
    assert_names("a", "rank 257", ff(x, w, &a257, &b257));
    assert_names("x", "scalar x", ff(&zeros(&[], F32), w, &a, &b));
    assert_names("t", "f16 t", bw(g, x, &zeros(&[5, 3], F16), &a, &b));
    assert_names("t", "t [m, r + 1]", bw(g, x, &zeros(&[5, 4], F32), &a, &b));
    assert_names(
        "g",
        "g [m, n + 1]",
        bw(&zeros(&[5, N + 1], F32), x, t, &a, &b),
    );
    assert_names("g", "g [m + 1, n]", bw(&zeros(&[6, N], F32), x, t, &a, &b));
    assert_names(
        "a",
        "a [r, k + 1] (backward)",
        bw(g, x, t, &zeros(&[3, K + 1], F32), &b),
    );
    assert_names(
        "x",
        "scalar x (backward)",
        bw(g, &zeros(&[], F32), t, &a, &b),
    );
}

/// Bad input to the pool's ops: wrong dtypes and shapes, ids of the wrong
/// dtype or length, a scalar x.
#[test]
fn bad_pool_input_is_an_error_naming_the_operand() {
    use CandleDType::{BF16, F16, F32, I32, I64, U32};
    let case = pool_case::<f32>(5, &MIXED, mixed_ids(5), 14);
    let (ts, pool) = (tensors(&case), pool(&case));
    let (x, w, g, t, ids) = (&ts.x, &ts.w, &ts.g, &ts.t, &ts.ids);
    let mf = |x: &Tensor, w: &Tensor, ids: &Tensor| multi_adapter_forward(&pool, x, w, ids);
    let mt =
        |x: &Tensor, w: &Tensor, ids: &Tensor| multi_adapter_forward_saving_t(&pool, x, w, ids);
    let mb = |g: &Tensor, x: &Tensor, t: &Tensor, ids: &Tensor| {
        multi_adapter_backward(&pool, g, x, w, t, ids, BackwardRequest::default())
    };
    assert_names("x", "x [m, k + 1]", mf(&zeros(&[5, K + 1], F32), w, ids));
    assert_names("w", "w [n + 1, k]", mt(x, &zeros(&[N + 1, K], F32), ids));
    assert_names("x", "bf16 x", mf(&zeros(&[5, K], BF16), w, ids));
    assert_names("ids", "f32 ids", mf(x, w, &zeros(&[5], F32)));
    assert_names("ids", "i64 ids", mt(x, w, &zeros(&[5], I64)));
    assert_names("ids", "ids [m + 1]", mf(x, w, &zeros(&[6], I32)));
    assert_names("ids", "ids [1, m]", mf(x, w, &zeros(&[1, 5], I32)));
    assert_names("x", "scalar x", mf(&zeros(&[], F32), w, ids));
    assert_names(
        "ids",
        "ids [m - 1] (backward)",
        mb(g, x, t, &zeros(&[4], U32)),
    );
    assert_names(
        "t",
        "t [m, max_rank - 1]",
        mb(g, x, &zeros(&[5, 11], F32), ids),
    );
    assert_names("t", "f16 t", mb(g, x, &zeros(&[5, 12], F16), ids));
    assert_names("g", "f16 g", mb(&zeros(&[5, N], F16), x, t, ids));
    assert_names("g", "g [m, n - 1]", mb(&zeros(&[5, N - 1], F32), x, t, ids));
}

/// A NaN in one token's x reaches that token's rows of y and t only: every
/// other row has the bits of the run without it.
#[test]
fn nan_in_one_token_stays_in_its_rows() {
    fn check<T: CandleElement>() {
        let (m, token) = (37, 8);
        let clean = pool_case::<T>(m, &MIXED, mixed_ids(m), 15);
        let mut dirty = clean.clone();
        dirty.x[token * K + 7] = <T as Element>::from_f64(f64::NAN);
        // Token 8 uses slot 3 (rank 12) of the pool.
        assert_eq!(clean.slot_of(token), Some(3));
        let pool = pool(&clean);
        let run = |case: &PoolCase<T>| {
            let ts = tensors(case);
            let single = single::<T>(m, 4, 16);
            let (a, b, s) = adapter_tensors(&single);
            let (y1, t1) = fused_forward_saving_t::<T>(&ts.x, &ts.w, &a, &b, s).unwrap();
            let (y2, t2) = multi_adapter_forward_saving_t(&pool, &ts.x, &ts.w, &ts.ids).unwrap();
            [y1, t1, y2, t2]
        };
        let (want, got) = (run(&clean), run(&dirty));
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let cols = w.dims()[1];
            let row_bits = |t: &Tensor| -> Vec<Vec<u64>> {
                bits::<T>(t).chunks(cols).map(<[u64]>::to_vec).collect()
            };
            let (w, g) = (row_bits(w), row_bits(g));
            for row in 0..m {
                if row == token {
                    assert!(
                        g[row].iter().any(|&b| f64::from_bits(b).is_nan()),
                        "output {i}: NaN lost"
                    );
                } else {
                    assert_eq!(g[row], w[row], "output {i} row {row} {:?}", dtype_of::<T>());
                }
            }
        }
    }
    check::<f32>();
    check::<f16>();
    check::<bf16>();
}

/// U32 ids are the I32 ids' bits: u32::MAX is -1 (base only), and an id
/// from 2^31 on is out of range, served as base only and counted.
#[test]
fn u32_ids_serve_max_as_base_only() {
    let m = 9;
    let ids: Vec<i32> = vec![0, -1, 3, -1, 2, 0, i32::MIN, 3, -1];
    let case = pool_case::<f16>(m, &MIXED, ids.clone(), 17);
    let (ts, pool) = (tensors(&case), pool(&case));
    let ids_u32: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
    assert_eq!(ids_u32[1], u32::MAX);
    assert_eq!(ids_u32[6], 1 << 31);
    let u = tensor(&ids_u32, &[m]);

    let before = pool.bad_id_count().unwrap();
    let (y, t) = multi_adapter_forward_saving_t(&pool, &ts.x, &ts.w, &u).unwrap();
    assert_eq!(pool.bad_id_count().unwrap(), before + 1, "the id 2^31");
    // The reference serves these tokens the base model only.
    for token in [1, 3, 6, 8] {
        assert!(case.adapter_of(token).is_none());
    }
    check_y("u32 ids", &case, false, &values::<f16>(&y)).unwrap();
    check_t("u32 ids", &case, &t);
    let (y_i32, _) = multi_adapter_forward_saving_t(&pool, &ts.x, &ts.w, &ts.ids).unwrap();
    assert_eq!(bits::<f16>(&y), bits::<f16>(&y_i32));

    let req = BackwardRequest::default();
    let from_u32 = multi_adapter_backward(&pool, &ts.g, &ts.x, &ts.w, &ts.t, &u, req).unwrap();
    check_grads("u32 ids", &case, &from_u32, None);
}

/// A pool on another device than the tensors' (a GPU pool, candle's Cpu
/// tensors) is refused with an error naming the first operand.
#[test]
fn gpu_pool_with_cpu_tensors_is_refused() {
    let Some(gpu) = gpu() else { return };
    let case = pool_case::<bf16>(5, &MIXED, mixed_ids(5), 18);
    let ts = tensors(&case);
    let cfg = PoolConfig {
        slots: 4,
        max_rank: 12,
        n: N,
        k: K,
    };
    let pool = AdapterPool::<bf16>::new(&gpu, cfg).unwrap();
    let req = BackwardRequest::default();
    let errors = [
        multi_adapter_forward(&pool, &ts.x, &ts.w, &ts.ids).err(),
        multi_adapter_forward_saving_t(&pool, &ts.x, &ts.w, &ts.ids).err(),
        multi_adapter_backward(&pool, &ts.g, &ts.x, &ts.w, &ts.t, &ts.ids, req).err(),
    ];
    for err in errors {
        let msg = err
            .expect("a pool on another device is refused")
            .to_string();
        assert!(
            msg.contains("`x`") && msg.contains("pool's device differs"),
            "{msg}"
        );
    }
}

/// The optimizer step on candle gradients is the op's step on the same
/// values, bit for bit; a gradient of the wrong dtype or shape is an error
/// naming it that changes nothing.
#[test]
fn adamw_step_on_tensors_matches_the_op() {
    use lora_kernels::candle::adamw::step;
    use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer};
    let case = pool_case::<bf16>(5, &MIXED, mixed_ids(5), 17);
    let cfg = pool(&case).config();
    let hyper = SlotHyper {
        lr: 0.01,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        anchor_pull: 0.0,
    };
    let trained = || {
        let mut pool = pool(&case);
        let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
        let (a, b) = (
            random::<f32>(&mut rng(1), 4 * K),
            random::<f32>(&mut rng(2), N * 4),
        );
        opt.load_adapter(&mut pool, 1, &a, &b, 4, 0.5, hyper)
            .unwrap();
        (pool, opt)
    };
    let mut r = rng(3);
    let ga = random::<f32>(&mut r, cfg.slots * cfg.max_rank * K);
    let gb = random::<f32>(&mut r, cfg.slots * N * cfg.max_rank);
    let (ga_t, gb_t) = (
        tensor(&ga, &[cfg.slots, cfg.max_rank, K]),
        tensor(&gb, &[cfg.slots, N, cfg.max_rank]),
    );

    let (mut want_pool, mut want_opt) = trained();
    let dev = want_pool.device().clone();
    let (ga_d, gb_d) = (dev.upload(&ga).unwrap(), dev.upload(&gb).unwrap());
    want_opt.step(&mut want_pool, &ga_d, &gb_d).unwrap();

    let (mut pool, mut opt) = trained();
    let before = opt.master(&pool, 1).unwrap();
    let bad_shape = tensor(&ga[1..], &[cfg.slots * cfg.max_rank * K - 1]);
    assert_names(
        "grad_a",
        "grad_a [len - 1]",
        step(&mut opt, &mut pool, &bad_shape, &gb_t),
    );
    let bf16_b = gb_t.to_dtype(CandleDType::BF16).unwrap();
    assert_names(
        "grad_b",
        "bf16 grad_b",
        step(&mut opt, &mut pool, &ga_t, &bf16_b),
    );
    assert_eq!(
        opt.master(&pool, 1).unwrap(),
        before,
        "a failed step changed the masters"
    );
    assert_eq!(opt.steps().unwrap()[1], 0);

    step(&mut opt, &mut pool, &ga_t, &gb_t).unwrap();
    assert_eq!(
        opt.master(&pool, 1).unwrap(),
        want_opt.master(&want_pool, 1).unwrap()
    );
    assert_ne!(opt.master(&pool, 1).unwrap(), before);
    let (got, want) = (
        pool.adapter(1).unwrap().unwrap(),
        want_pool.adapter(1).unwrap().unwrap(),
    );
    assert_eq!((got.a, got.b), (want.a, want.b));
}
