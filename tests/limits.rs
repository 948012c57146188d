//! Sizes at the edges of what validation accepts: size products that would
//! overflow, allocations that cannot be had, launch grids past CUDA's limits,
//! and scratch used with another device. Each gives an `Err` naming the
//! operand or size, never a panic, an abort or a wrapped count, and a failed
//! call changes nothing. Tests needing more memory than a CPU machine has
//! run on a GPU only (they skip without one).
mod common;

use common::*;
use half::f16;
use lora_kernels::ops::fused_forward::{LaunchForm, Regime, fused_forward_tuned};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
};
use lora_kernels::ops::multi_adapter_forward::{Routing, multi_adapter_forward_saving_t};
use lora_kernels::{AdapterPool, BufMut, BufRef, Device, DeviceAdapter, Dims, Error, PoolConfig};

/// The GPU tests past 2^31 elements each take tens of GB of device memory
/// (about 66 and 45): run side by side, as the test harness would, they
/// would not fit one GPU together, so they take turns.
static HUGE_GPU_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn huge_gpu_turn() -> std::sync::MutexGuard<'static, ()> {
    // A failed huge test (a poisoned lock) does not fail the other one.
    HUGE_GPU_TEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// The smallest token count whose row tiles of `rows` pass grid.y's 65535.
fn past_grid_y(rows: usize) -> usize {
    65535 * rows + 1
}

fn assert_names(err: Error, name: &str) {
    match &err {
        Error::InvalidArgument { name: got, .. } => assert_eq!(*got, name, "{err}"),
        other => panic!("expected an error naming `{name}`, got {other:?}"),
    }
}

#[test]
fn impossible_host_allocations_are_errors() {
    let dev = Device::host().unwrap();
    // Bytes past isize::MAX, and a length no allocator can provide.
    for len in [usize::MAX / 2, 1 << 60] {
        assert_names(dev.zeros::<f32>(len).unwrap_err(), "len");
    }
    let cfg = PoolConfig {
        slots: 2,
        max_rank: 8,
        n: 3,
        k: 5,
    };
    let pool = AdapterPool::<f32>::new(&dev, cfg).unwrap();
    // tokens * max_rank overflows usize.
    assert_names(pool.reserve_tokens(usize::MAX / 4).unwrap_err(), "tokens");
    // The pool still works afterwards.
    pool.reserve_tokens(4).unwrap();
}

/// Runs the fused kernel (rank 1, n = k = 1) with m tokens in `regime`:
/// small buffers, so validation and the grid check are all that run. (The
/// shared shrink's launches, on the multi-adapter kernel, have a 1-D grid
/// that takes such m.)
fn forward_m<T: lora_kernels::KernelElement>(regime: Regime, m: usize) -> Error {
    let dev = Device::host().unwrap();
    let mut g = rng(m as u64);
    let (x, w, a, b) = (
        random::<T>(&mut g, m),
        random(&mut g, 1),
        random(&mut g, 1),
        random(&mut g, 1),
    );
    let y0: Vec<T> = random(&mut g, m);
    let mut y = y0.clone();
    let adapter = DeviceAdapter::new(&a, &b, 1, 0.5);
    let (xd, wd) = (BufRef::from(&x), BufRef::from(&w));
    let form = LaunchForm {
        shared_shrink: Some(false),
        ..LaunchForm::default()
    };
    let outputs = (BufMut::from(&mut y), None);
    let err = fused_forward_tuned(
        regime,
        form,
        &dev,
        Dims::new(m, 1, 1),
        (xd, wd),
        &adapter,
        0.0,
        outputs,
    )
    .unwrap_err();
    assert!(y == y0, "a failed call changed y");
    err
}

#[test]
fn forward_grids_past_cuda_limits_are_errors() {
    // SIMT tiles of 32 rows (f32), prefill tiles of 128 (f16): one token more
    // than grid.y can cover.
    assert_names(forward_m::<f32>(Regime::Simt, past_grid_y(32)), "m");
    assert_names(forward_m::<f16>(Regime::Prefill, past_grid_y(128)), "m");
}

#[test]
fn backward_dx_grid_past_cuda_limits_is_an_error() {
    let dev = Device::host().unwrap();
    let m = past_grid_y(32); // the SIMT dx tile's 32 rows
    let mut g = rng(5);
    let (gy, x, t): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (random(&mut g, m), random(&mut g, m), random(&mut g, m));
    let (w, a, b): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (random(&mut g, 1), random(&mut g, 1), random(&mut g, 1));
    let adapter = DeviceAdapter::new(&a, &b, 1, 0.5);
    let dx0: Vec<f32> = random(&mut g, m);
    let (mut dx, mut da, mut db) = (dx0.clone(), vec![7.0f32], vec![7.0f32]);
    let grads = Grads {
        dx: Some((&mut dx).into()),
        da: Some((&mut da).into()),
        db: Some((&mut db).into()),
    };
    let mut scratch = BackwardScratch::new(&dev).unwrap();
    let inputs = DeviceBackwardInputs::new(&gy, &x, &w, &t);
    let dims = Dims::new(m, 1, 1);
    let opts = BackwardOptions::default();
    let err = lora_backward(&dev, dims, &adapter, inputs, grads, opts, &mut scratch).unwrap_err();
    assert_names(err, "m");
    assert!(
        dx == dx0 && da == [7.0] && db == [7.0],
        "a failed call changed a gradient"
    );
}

/// A scratch made on the host runtime, used on a GPU: its host memory would
/// reach the kernels as device pointers.
#[test]
fn gpu_backward_scratch_from_another_device_is_an_error() {
    let Some(gpu) = gpu() else { return };
    let mut host_scratch = BackwardScratch::new(&Device::host().unwrap()).unwrap();
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let (gy, x, w, t) = (up(&[1.0; 2]), up(&[1.0; 2]), up(&[1.0]), up(&[1.0; 2]));
    let (a, b) = (up(&[1.0]), up(&[1.0]));
    let mut db = gpu.zeros::<f32>(1).unwrap();
    let grads = Grads {
        dx: None,
        da: None,
        db: Some((&mut db).into()),
    };
    let adapter = DeviceAdapter::new(&a, &b, 1, 1.0);
    let inputs = DeviceBackwardInputs::new(&gy, &x, &w, &t);
    let dims = Dims::new(2, 1, 1);
    let opts = BackwardOptions::default();
    let err =
        lora_backward(&gpu, dims, &adapter, inputs, grads, opts, &mut host_scratch).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BackendMismatch {
                operand: "scratch",
                ..
            }
        ),
        "{err}"
    );
}

/// The multi-adapter shrink writing `t` past 2^31 entries (m x max_rank):
/// the last token's row sits past any 32-bit offset, and the token count
/// times the SIMT units per token (m x 64) would pass the op's 2^31 item
/// limit, which the prefill's units of 16 tokens and 32 ranks (m / 2 of them)
/// stay under. About 66 GB of device memory (t is m x 256 f32): GPU only.
#[test]
fn gpu_shrink_units_past_2_pow_31() {
    let Some(gpu) = gpu() else { return };
    let _turn = huge_gpu_turn();
    let (max_rank, n, k) = (256, 8, 8);
    let m = (1usize << 31) / max_rank * 8 + 8;
    let cfg = PoolConfig {
        slots: 1,
        max_rank,
        n,
        k,
    };
    let mut g = rng(9);
    let (a, b): (Vec<f16>, Vec<f16>) = (random(&mut g, max_rank * k), random(&mut g, n * max_rank));
    let mut pool = AdapterPool::<f16>::new(&gpu, cfg).unwrap();
    pool.load(0, &a, &b, max_rank, 0.5).unwrap();
    // Every token the same x row, so the last tokens' t is known on the host.
    let row: Vec<f16> = random(&mut g, k);
    let x: Vec<f16> = row.iter().copied().cycle().take(m * k).collect();
    let w = vec![f16::ZERO; n * k];
    let (xd, wd, ids) = (
        gpu.upload(&x).unwrap(),
        gpu.upload(&w).unwrap(),
        gpu.zeros::<i32>(m).unwrap(),
    );
    let mut t = gpu.zeros::<f32>(m * max_rank).unwrap();
    let mut y = gpu.zeros::<f16>(m * n).unwrap();
    multi_adapter_forward_saving_t(
        &pool,
        m,
        &xd,
        &wd,
        &Routing::Tokens((&ids).into()),
        &mut y,
        &mut t,
    )
    .unwrap();
    // Only the last token's row comes back (t is ~64 GiB).
    let lora_kernels::Buffer::Cuda(t) = &t else {
        unreachable!("a GPU buffer")
    };
    let stream = gpu.cuda_stream().unwrap();
    let last = stream.clone_dtoh(&t.slice((m - 1) * max_rank..)).unwrap();
    for (j, got) in last.iter().enumerate() {
        let want: f64 = (0..k)
            .map(|c| row[c].to_f64() * a[j * k + c].to_f64())
            .sum();
        let abs: f64 = (0..k)
            .map(|c| (row[c].to_f64() * a[j * k + c].to_f64()).abs())
            .sum();
        let bound = f32_sum_bound::<f32>(want, abs);
        assert!(
            (*got as f64 - want).abs() <= bound,
            "t[{j}] = {got}, want {want}"
        );
    }
}

/// AdamW over a slot of more than 2^31 parameters (n + k past i32): with
/// 32-bit offsets the kernel's element count wrapped. Constant gradients,
/// so the first step moves every weight by lr exactly as AdamW's first step
/// does (m1 / bias1 = g, sqrt(m2 / bias2) = |g|). About 45 GB of device
/// memory: GPU only.
#[test]
fn gpu_adamw_past_2_pow_31_parameters() {
    use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
    let Some(gpu) = gpu() else { return };
    let _turn = huge_gpu_turn();
    let (n, k) = (1usize << 30, (1usize << 30) + 8);
    let cfg = PoolConfig {
        slots: 1,
        max_rank: 1,
        n,
        k,
    };
    let mut pool = AdapterPool::<f16>::new(&gpu, cfg).unwrap();
    let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
    let hyper = SlotHyper {
        lr: 0.125,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        anchor_pull: 0.0,
    };
    let (a, b) = (vec![0.5f32; k], vec![-0.5f32; n]);
    opt.load_adapter(&mut pool, 0, &a, &b, 1, 1.0, hyper)
        .unwrap();
    drop((a, b));
    let (ga, gb) = (
        gpu.upload(&vec![1.0f32; k]).unwrap(),
        gpu.upload(&vec![-1.0f32; n]).unwrap(),
    );
    opt.step(&mut pool, &ga, &gb).unwrap();
    assert!(matches!(
        opt.statuses().unwrap()[0],
        SlotStatus::Updated { .. }
    ));
    let (a, b) = opt.master(&pool, 0).unwrap();
    // 0.5 -/+ 0.125 (eps moves it by ~1e-9, below f32's resolution at 0.375).
    for (what, v, want) in [("a", &a, 0.375f32), ("b", &b, -0.375)] {
        for i in [0, v.len() / 2, v.len() - 1] {
            assert!(
                (v[i] - want).abs() <= 1e-6,
                "{what}[{i}] = {}, expected {want}",
                v[i]
            );
        }
    }
}

/// The backward's u/da/db grids have a layer (grid.z, at most 65535) per
/// slot, or per token for a pool larger than the batch. A pool of 65536
/// slots trains a batch of 2 tokens (slot 0's db written, every other slot's
/// zeroed); past 65535 layers the call is refused before anything runs,
/// naming `slots` (a batch as large as the pool) or `m` (a batch of 65536
/// tokens in a larger pool).
#[test]
fn backward_grid_layers_past_65535_are_errors() {
    use lora_kernels::ops::lora_backward::multi_adapter_backward;
    let dev = Device::host().unwrap();
    let (n, k, scale) = (2, 3, 2.0f32);
    let run = |slots: usize, ids: &[i32]| {
        let cfg = PoolConfig {
            slots,
            max_rank: 1,
            n,
            k,
        };
        let mut pool = AdapterPool::<f32>::new(&dev, cfg).unwrap();
        pool.load(0, &[0.5f32; 3], &[0.25f32; 2], 1, scale).unwrap();
        let m = ids.len();
        let mut g = rng(4);
        let (gy, x, w, t) = (
            random::<f32>(&mut g, m * n),
            dev.upload(&random::<f32>(&mut g, m * k)).unwrap(),
            dev.upload(&random::<f32>(&mut g, n * k)).unwrap(),
            random::<f32>(&mut g, m),
        );
        let (gd, td, idd) = (
            dev.upload(&gy).unwrap(),
            dev.upload(&t).unwrap(),
            dev.upload(ids).unwrap(),
        );
        let mut db = dev.upload(&vec![1.5f32; slots * n]).unwrap();
        let grads = Grads {
            dx: None,
            da: None,
            db: Some((&mut db).into()),
        };
        let inputs = DeviceBackwardInputs::new(&gd, &x, &w, &td);
        let mut scratch = BackwardScratch::new(&dev).unwrap();
        let opts = BackwardOptions::default();
        let result = multi_adapter_backward(&pool, m, &idd, inputs, grads, opts, &mut scratch);
        (result, dev.download(&db).unwrap(), gy, t)
    };
    // Token 0 trains slot 0, token 1 nothing: db[0][c] = scale g[0][c] t[0].
    let (result, db, gy, t) = run(65536, &[0, -1]);
    result.unwrap();
    for (c, &v) in db[..n].iter().enumerate() {
        let want = scale * gy[c] * t[0];
        assert!(
            (v - want).abs() <= 1e-6 * want.abs(),
            "db[0][{c}] = {v}, want {want}"
        );
    }
    assert!(
        db[n..].iter().all(|&v| v == 0.0),
        "untrained slots not zeroed"
    );
    for (slots, m, name) in [(65536, 65536, "slots"), (65537, 65536, "m")] {
        let ids: Vec<i32> = (0..m).collect();
        let (result, db, ..) = run(slots, &ids);
        assert_names(result.unwrap_err(), name);
        assert!(db.iter().all(|&v| v == 1.5), "db changed");
    }
}
