//! lora_backward and multi_adapter_backward: dx, da, db.

use super::multi::{HostAdapter, POOL_MAX_RANK, POOL_RANKS, PoolData, served, token_ids};
use super::*;
use lora_kernels::Buffer;

pub(super) fn backward_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let decode = Dims::new(M_DECODE, N, K_ANY);
    let opts = |deterministic, accumulate| BackwardOptions {
        accumulate,
        deterministic,
        ..Default::default()
    };
    for deterministic in [true, false] {
        rows.extend(backward::<f32>(dev, decode, 8, opts(deterministic, false))?);
        rows.extend(backward::<bf16>(
            dev,
            decode,
            8,
            opts(deterministic, false),
        )?);
    }
    // The prefill tiles and the 16-byte path of the tensor-core dx (n, k % 8 == 0).
    let prefill = Dims::new(M_PREFILL, N_ALIGNED, K_ALIGNED);
    rows.extend(backward::<bf16>(dev, prefill, 16, opts(true, false))?);
    rows.extend(backward::<f16>(dev, prefill, 16, opts(false, false))?);
    // dx on Hopper's wgmma and TMA (BackwardOptions::wgmma), where it runs:
    // the host runtime and GPUs of compute capability 9.0.
    if dev.compute_capability().is_none_or(|cc| cc == (9, 0)) {
        let wgmma = |deterministic| BackwardOptions {
            wgmma: Some(true),
            ..opts(deterministic, false)
        };
        rows.extend(backward::<bf16>(dev, prefill, 16, wgmma(true))?);
        rows.extend(backward::<f16>(dev, prefill, 5, wgmma(false))?);
    }
    // Accumulate: added to the gradients already there.
    rows.extend(backward::<bf16>(dev, decode, 8, opts(true, true))?);
    rows.extend(backward::<f32>(dev, decode, 8, opts(false, true))?);
    Ok(rows)
}

/// The reference gradients (dx, da, db) in f64 of one adapter, added to
/// `prior` when given (accumulate mode; da and db are f32 in the reference).
fn gradients(
    dims: Dims,
    (g, x, w): (&[f64], &[f64], &[f64]),
    (a, b, rank, scale): (&[f64], &[f64], usize, f32),
    t: &[f32],
    prior: Option<&[Vec<f64>; 3]>,
) -> Res<[Vec<f64>; 3]> {
    let Dims { m, n, k } = dims;
    let f32s = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let (mut dx, mut da, mut db) = match prior {
        Some([dx, da, db]) => (dx.clone(), f32s(da), f32s(db)),
        None => (vec![0.0; m * k], vec![0f32; rank * k], vec![0f32; n * rank]),
    };
    let inputs = BackwardInputs {
        g,
        x,
        w,
        adapter: Adapter { a, b, rank, scale },
        t,
    };
    let grads = Gradients {
        dx: Some(&mut dx),
        da: Some(&mut da),
        db: Some(&mut db),
        accumulate: prior.is_some(),
    };
    reference::backward(dims, &inputs, grads)?;
    Ok([dx, wide(&da), wide(&db)])
}

/// The bounds of dx, da, db (pool or single adapter: `rank` is the largest).
fn gradient_models<T: Element>(
    dev: &Device,
    dims: Dims,
    rank: usize,
    max_a: f64,
    opts: BackwardOptions,
) -> [Model; 3] {
    let Dims { m, n, .. } = dims;
    // u = s g b: the product (rounded for f32), n additions, the scale.
    let u = n + 2;
    // Accumulating adds the old value: one more addition.
    let old = opts.accumulate as usize;
    let dx = if T::DTYPE == DType::F32 {
        // SIMT: u's product with a, then r additions after the base terms.
        model::<T>(u + rank + 1 + old)
    } else {
        // Tensor cores: u as hi + lo, 2r additions after the base terms.
        model::<T>(u + 2 * rank + old)
            .mma(dev)
            .split::<T>(rank as f64 * max_a)
    };
    // Token ranges of R tokens, S of them, then their sum (partials in a
    // fixed order, or atomics): R + S <= m + 1 additions.
    let da = model::<f32>(u + 1 + m + 1 + old);
    let db = model::<f32>(1 + m + 1 + 1 + old);
    [dx, da, db]
}

/// The three rows of one backward launch.
fn gradient_rows(
    labels: [Label; 3],
    got: [Vec<f64>; 3],
    [want, control, abs_all, abs_base]: [[Vec<f64>; 3]; 4],
    models: [Model; 3],
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (i, label) in labels.into_iter().enumerate() {
        let abs_low = minus(&abs_all[i], &abs_base[i]);
        let bound = models[i].bounds(&want[i], &abs_all[i], &abs_low);
        rows.push(judged(label, &got[i], &want[i], &control[i], &bound));
    }
    rows
}

fn gradient_labels<T: Element>(
    op: &'static str,
    dims: Dims,
    rank: &str,
    opts: BackwardOptions,
) -> [Label; 3] {
    let Dims { m, n, k } = dims;
    let dx = if T::DTYPE == DType::F32 {
        "dx, Simt".to_string()
    } else if opts.wgmma == Some(true) {
        "dx, wgmma + TMA".to_string()
    } else {
        let tiles = if m <= 64 { "Decode" } else { "Prefill" };
        format!("dx, {tiles} tiles, {}", loads(n % 8 == 0 && k % 8 == 0))
    };
    let mut mode = if opts.deterministic {
        "fixed-order sum"
    } else {
        "atomics"
    }
    .to_string();
    let dx = if opts.accumulate {
        mode += ", accumulate";
        format!("{dx}, accumulate")
    } else {
        dx
    };
    [
        label::<T>(op, dx, shape(dims, rank)),
        label::<T>(op, format!("da (f32), {mode}"), shape(dims, rank)),
        label::<T>(op, format!("db (f32), {mode}"), shape(dims, rank)),
    ]
}

/// One lora_backward launch: dx, da, db, with t as the forward saves it.
fn backward<T: KernelElement>(
    dev: &Device,
    dims: Dims,
    rank: usize,
    opts: BackwardOptions,
) -> Res<Vec<Row>> {
    let Dims { m, n, k } = dims;
    let (g, x, w) = (
        data::<T>(m * n, 21),
        data::<T>(m * k, 22),
        data::<T>(n * k, 23),
    );
    let (a, b) = (data::<T>(rank * k, 24), data::<T>(n * rank, 25));
    let scale = balanced_scale(rank);
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank,
        scale,
    };
    // t as fused_forward_saving_t saves it: f32, rounded once.
    let t = reference::lora_intermediate(dims, &x, &adapter)?;

    let (gd, xd, wd, td) = (
        dev.upload(&g)?,
        dev.upload(&x)?,
        dev.upload(&w)?,
        dev.upload(&t)?,
    );
    let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
    // The gradients already there when accumulating, else NaN (all overwritten).
    let (dx0, da0, db0) = if opts.accumulate {
        let v = |len, seed| common::values::<f32>(len, seed, 1.0);
        (data::<T>(m * k, 26), v(rank * k, 27), v(n * rank, 28))
    } else {
        (nans(m * k), nans(rank * k), nans(n * rank))
    };
    let mut dx = dev.upload(&dx0)?;
    let mut da = dev.upload(&da0)?;
    let mut db = dev.upload(&db0)?;
    let grads = Grads {
        dx: Some((&mut dx).into()),
        da: Some((&mut da).into()),
        db: Some((&mut db).into()),
    };
    let mut scratch = BackwardScratch::new(dev)?;
    let inputs = DeviceBackwardInputs::new(&gd, &xd, &wd, &td);
    let device_adapter = DeviceAdapter::new(&ad, &bd, rank, scale);
    lora_backward(
        dev,
        dims,
        &device_adapter,
        inputs,
        grads,
        opts,
        &mut scratch,
    )?;
    let got = download_grads(dev, &dx, &da, &db)?;

    let (exact, absolute) = (widened(&g, &x, &w), absolute_values(&g, &x, &w));
    let exact = (&exact.0[..], &exact.1[..], &exact.2[..]);
    let absolute = (&absolute.0[..], &absolute.1[..], &absolute.2[..]);
    let (a64, b64, aa, ba) = (wide(&a), wide(&b), abs(&a), abs(&b));
    let t_abs: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let prior = [wide(&dx0), wide(&da0), wide(&db0)];
    let prior_abs = prior.clone().map(|v| v.iter().map(|e| e.abs()).collect());
    let (prior, prior_abs) = match opts.accumulate {
        true => (Some(&prior), Some(&prior_abs)),
        false => (None, None),
    };
    let reference = [
        gradients(dims, exact, (&a64, &b64, rank, scale), &t, prior)?,
        gradients(dims, exact, (&a64, &b64, rank, off::<T>(scale)), &t, prior)?,
        gradients(
            dims,
            absolute,
            (&aa, &ba, rank, scale.abs()),
            &t_abs,
            prior_abs,
        )?,
        gradients(dims, absolute, (&aa, &ba, rank, 0.0), &t_abs, prior_abs)?,
    ];
    let models = gradient_models::<T>(dev, dims, rank, max_abs(&a64), opts);
    let labels = gradient_labels::<T>("lora_backward", dims, &rank.to_string(), opts);
    Ok(gradient_rows(labels, got, reference, models))
}

pub(super) fn multi_backward_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = multi_backward::<bf16>(dev, Dims::new(M_DECODE, N, K_ANY), false)?;
    let prefill = Dims::new(M_PREFILL, N_ALIGNED, K_ALIGNED);
    rows.extend(multi_backward::<bf16>(dev, prefill, true)?);
    Ok(rows)
}

/// The pool backward's reference (docs/DESIGN.md section 12: a per-slot loop):
/// each occupied slot's tokens as one single-adapter batch, in the pool
/// layout; tokens without an adapter get dx = g w (scale 0).
fn pool_gradients(
    dims: Dims,
    (g, x, w): (&[f64], &[f64], &[f64]),
    pool: &[HostAdapter<f64>],
    ids: &[i32],
    t: &[f32],
) -> Res<[Vec<f64>; 3]> {
    let Dims { m, n, k } = dims;
    let (slots, max) = (POOL_RANKS.len(), POOL_MAX_RANK);
    let (mut dx, mut da, mut db) = (
        vec![0.0; m * k],
        vec![0.0; slots * max * k],
        vec![0.0; slots * n * max],
    );
    for slot in -1..pool.len() as i32 {
        let tokens: Vec<usize> = (0..m).filter(|&i| ids[i] == slot).collect();
        if tokens.is_empty() {
            continue;
        }
        let rows = |v: &[f64], width: usize| -> Vec<f64> {
            tokens
                .iter()
                .flat_map(|&i| v[i * width..(i + 1) * width].iter().copied())
                .collect()
        };
        let (a, b, rank, scale) = &pool[slot.max(0) as usize];
        let (rank, scale) = (*rank, if slot < 0 { 0.0 } else { *scale });
        let t_rows: Vec<f32> = tokens
            .iter()
            .flat_map(|&i| t[i * max..i * max + rank].iter().copied())
            .collect();
        let sub = Dims::new(tokens.len(), n, k);
        let [sdx, sda, sdb] = gradients(
            sub,
            (&rows(g, n), &rows(x, k), w),
            (a, b, rank, scale),
            &t_rows,
            None,
        )?;
        for (row, &i) in tokens.iter().enumerate() {
            dx[i * k..(i + 1) * k].copy_from_slice(&sdx[row * k..(row + 1) * k]);
        }
        if slot >= 0 {
            let s = slot as usize;
            for j in 0..rank {
                da[(s * max + j) * k..(s * max + j + 1) * k]
                    .copy_from_slice(&sda[j * k..(j + 1) * k]);
                for c in 0..n {
                    db[(s * n + c) * max + j] = sdb[c * rank + j];
                }
            }
        }
    }
    Ok([dx, da, db])
}

/// One multi_adapter_backward launch over the pool with per-token ids.
fn multi_backward<T: KernelElement>(
    dev: &Device,
    dims: Dims,
    deterministic: bool,
) -> Res<Vec<Row>> {
    let Dims { m, n, k } = dims;
    let (g, x, w) = (
        data::<T>(m * n, 31),
        data::<T>(m * k, 32),
        data::<T>(n * k, 33),
    );
    let pool_data = PoolData::<T>::new(n, k);
    let pool = pool_data.load(dev)?;
    let cfg = pool_data.config();
    let ids = token_ids(m);
    let served_ids = served(&ids);
    // t as multi_adapter_forward_saving_t saves it: [m, max_rank], each
    // token's rank, zero elsewhere (f32, rounded once).
    let mut t = vec![0f32; m * POOL_MAX_RANK];
    for (i, &id) in served_ids.iter().enumerate().filter(|(_, id)| **id >= 0) {
        let (a, b, rank, scale) = &pool_data.slots[id as usize];
        let adapter = Adapter {
            a,
            b,
            rank: *rank,
            scale: *scale,
        };
        let ti =
            reference::lora_intermediate(Dims::new(1, n, k), &x[i * k..(i + 1) * k], &adapter)?;
        t[i * POOL_MAX_RANK..i * POOL_MAX_RANK + rank].copy_from_slice(&ti);
    }

    let (gd, xd, wd) = (dev.upload(&g)?, dev.upload(&x)?, dev.upload(&w)?);
    let (td, idd) = (dev.upload(&t)?, dev.upload(&ids)?);
    let mut dx = dev.upload(&nans::<T>(m * k))?;
    let mut da = dev.upload(&nans::<f32>(cfg.slots * cfg.max_rank * k))?;
    let mut db = dev.upload(&nans::<f32>(cfg.slots * n * cfg.max_rank))?;
    let grads = Grads {
        dx: Some((&mut dx).into()),
        da: Some((&mut da).into()),
        db: Some((&mut db).into()),
    };
    let opts = BackwardOptions {
        accumulate: false,
        deterministic,
        ..Default::default()
    };
    let mut scratch = BackwardScratch::new(dev)?;
    let inputs = DeviceBackwardInputs::new(&gd, &xd, &wd, &td);
    multi_adapter_backward(&pool, m, &idd, inputs, grads, opts, &mut scratch)?;
    let got = download_grads(dev, &dx, &da, &db)?;

    let (exact, absolute) = (widened(&g, &x, &w), absolute_values(&g, &x, &w));
    let exact = (&exact.0[..], &exact.1[..], &exact.2[..]);
    let absolute = (&absolute.0[..], &absolute.1[..], &absolute.2[..]);
    let t_abs: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let ids = &served_ids;
    let reference = [
        pool_gradients(dims, exact, &pool_data.reference(false, |s| s), ids, &t)?,
        pool_gradients(dims, exact, &pool_data.reference(false, off::<T>), ids, &t)?,
        pool_gradients(
            dims,
            absolute,
            &pool_data.reference(true, f32::abs),
            ids,
            &t_abs,
        )?,
        pool_gradients(
            dims,
            absolute,
            &pool_data.reference(true, |_| 0.0),
            ids,
            &t_abs,
        )?,
    ];
    let max_a = pool_data
        .slots
        .iter()
        .map(|s| max_abs(&wide(&s.0)))
        .fold(0.0, f64::max);
    let models = gradient_models::<T>(dev, dims, POOL_MAX_RANK, max_a, opts);
    let labels = gradient_labels::<T>("multi_adapter_backward", dims, "1-16", opts);
    Ok(gradient_rows(labels, got, reference, models))
}

/// The three gradients back on the host, widened to f64.
fn download_grads<T: KernelElement>(
    dev: &Device,
    dx: &Buffer<T>,
    da: &Buffer<f32>,
    db: &Buffer<f32>,
) -> Res<[Vec<f64>; 3]> {
    Ok([
        wide(&dev.download(dx)?),
        wide(&dev.download(da)?),
        wide(&dev.download(db)?),
    ])
}

/// (g, x, w) widened exactly to f64.
fn widened<T: Element>(g: &[T], x: &[T], w: &[T]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    (wide(g), wide(x), wide(w))
}

/// (|g|, |x|, |w|) in f64, for the sums of |terms| in the bounds.
fn absolute_values<T: Element>(g: &[T], x: &[T], w: &[T]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    (abs(g), abs(x), abs(w))
}
