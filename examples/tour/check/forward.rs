//! fused_forward and fused_forward_saving_t: every regime, both load paths, a rank above 64,
//! split-K at decode.

use super::*;

pub(super) fn fused_forward_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let (simt, plain) = (Regime::Simt, Forward::Plain);
    let dims = Dims::new(M_DECODE, N, K_ANY);
    rows.extend(fused::<f32>(dev, simt, dims, 8, plain)?);
    rows.extend(fused::<f16>(dev, simt, dims, 8, plain)?);
    rows.extend(fused::<bf16>(dev, simt, dims, 8, plain)?);
    for (regime, m) in [(Regime::Decode, M_DECODE), (Regime::Prefill, M_PREFILL)] {
        for k in [K_ALIGNED, K_ANY] {
            let dims = Dims::new(m, N, k);
            rows.extend(fused::<f16>(dev, regime, dims, 16, plain)?);
            rows.extend(fused::<bf16>(dev, regime, dims, 16, plain)?);
        }
    }
    // Ranks above 64 take one more pass over k per 64-rank chunk.
    let dims = Dims::new(M_PREFILL, N, K_ALIGNED);
    rows.extend(fused::<bf16>(dev, Regime::Prefill, dims, 80, plain)?);
    // Several column tiles: 300 columns are 3 tiles of 128 on the multi-adapter kernel, which
    // serves a one-adapter prefill at rank 16 (t computed once, shared by every tile).
    let dims = Dims::new(M_PREFILL, 300, K_ALIGNED);
    rows.extend(fused::<bf16>(dev, Regime::Prefill, dims, 16, plain)?);
    // 16 k-tiles: decode launches split the k-loop across blocks (split-K:
    // 3 per column tile at n = 45, on 132 SMs or the host runtime), 16- and
    // 64-row tiles, both load paths.
    for m in [M_SMALL, M_DECODE] {
        let dims = Dims::new(m, N, K_SPLIT);
        rows.extend(fused::<bf16>(dev, Regime::Decode, dims, 16, plain)?);
    }
    let dims = Dims::new(M_SMALL, N, K_SPLIT_F16);
    rows.extend(fused::<f16>(dev, Regime::Decode, dims, 16, plain)?);
    // The decode with w loaded straight into registers (LaunchForm::
    // direct_decode): split-K and a chunk's tail at k = 1000, one chunk
    // round at 72.
    let direct = Forward::Direct;
    let dims = Dims::new(M_SMALL, N, K_SPLIT);
    rows.extend(fused::<bf16>(dev, Regime::Decode, dims, 16, direct)?);
    let dims = Dims::new(M_SMALL, N, K_ALIGNED);
    rows.extend(fused::<f16>(dev, Regime::Decode, dims, 16, direct)?);
    // beta != 0: the kernels read the old y (with beta 0 they never do).
    let beta = Forward::Beta(0.5);
    rows.extend(fused::<f32>(
        dev,
        simt,
        Dims::new(M_DECODE, N, K_ANY),
        8,
        beta,
    )?);
    rows.extend(fused::<bf16>(
        dev,
        Regime::Decode,
        Dims::new(M_SMALL, N, K_ANY),
        8,
        beta,
    )?);
    rows.extend(fused::<f16>(
        dev,
        Regime::Prefill,
        Dims::new(M_PREFILL, N, K_ALIGNED),
        8,
        beta,
    )?);
    // The prefill on Hopper's wgmma and TMA (LaunchForm::wgmma), where it
    // runs: the host runtime and GPUs of compute capability 9.0. Three
    // column tiles, two a block (t from the first serves the second).
    if dev.compute_capability().is_none_or(|cc| cc == (9, 0)) {
        let dims = Dims::new(M_PREFILL, 300, K_ALIGNED);
        rows.extend(fused::<bf16>(
            dev,
            Regime::Prefill,
            dims,
            16,
            Forward::Wgmma,
        )?);
        rows.extend(fused::<f16>(dev, Regime::Prefill, dims, 5, Forward::Wgmma)?);
    }
    Ok(rows)
}

/// fused_forward_saving_t picks the regime itself: f32 Simt, f16 at m = 5
/// Decode, bf16 at m = 130 Prefill. Rows for y and for the saved t.
pub(super) fn saving_t_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let dims = Dims::new(M_DECODE, N, K_ANY);
    rows.extend(fused::<f32>(dev, Regime::Simt, dims, 8, Forward::SavingT)?);
    let dims = Dims::new(M_SMALL, N, K_ALIGNED);
    rows.extend(fused::<f16>(
        dev,
        Regime::Decode,
        dims,
        3,
        Forward::SavingT,
    )?);
    let dims = Dims::new(M_PREFILL, N, K_ANY);
    rows.extend(fused::<bf16>(
        dev,
        Regime::Prefill,
        dims,
        1,
        Forward::SavingT,
    )?);
    Ok(rows)
}

/// Which fused-forward call a row makes.
#[derive(Clone, Copy, PartialEq)]
enum Forward {
    /// fused_forward_in with beta 0.
    Plain,
    /// fused_forward_in adding beta times the old y.
    Beta(f32),
    /// fused_forward_saving_t (beta 0, also writes t).
    SavingT,
    /// The wgmma prefill kernel (fused_forward_tuned, beta 0, also writes t).
    Wgmma,
    /// The shared-shrink decode with w loaded straight into registers
    /// (fused_forward_tuned, beta 0, also writes t).
    Direct,
}

/// One fused-forward launch in `regime` (fused_forward_saving_t picks that
/// regime itself): the row of y, and of t when saved.
fn fused<T: KernelElement>(
    dev: &Device,
    regime: Regime,
    dims: Dims,
    rank: usize,
    call: Forward,
) -> Res<Vec<Row>> {
    let Dims { m, n, k } = dims;
    let (x, w) = (data::<T>(m * k, 1), data::<T>(n * k, 2));
    let (a, b) = (data::<T>(rank * k, 3), data::<T>(n * rank, 4));
    let scale = balanced_scale(rank);
    let (beta, save_t) = match call {
        Forward::Beta(beta) => (beta, false),
        Forward::Plain => (0.0, false),
        Forward::SavingT | Forward::Wgmma | Forward::Direct => (0.0, true),
    };
    // The old y: read only with beta != 0; otherwise NaN, so that an element
    // the kernel does not write (or reads) fails. t also starts as NaN.
    let y_old = if beta != 0.0 {
        data::<T>(m * n, 5)
    } else {
        nans::<T>(m * n)
    };

    let (xd, wd) = (dev.upload(&x)?, dev.upload(&w)?);
    let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
    let adapter = DeviceAdapter::new(&ad, &bd, rank, scale);
    let mut yd = dev.upload(&y_old)?;
    let mut td = dev.upload(&nans::<f32>(m * rank))?;
    if matches!(call, Forward::Wgmma | Forward::Direct) {
        let form = LaunchForm {
            wgmma: Some(call == Forward::Wgmma),
            col_tiles: Some(2),
            direct_decode: call == Forward::Direct,
            ..LaunchForm::default()
        };
        let (xs, ys) = (
            ((&xd).into(), (&wd).into()),
            ((&mut yd).into(), Some((&mut td).into())),
        );
        fused_forward_tuned(regime, form, dev, dims, xs, &adapter, 0.0, ys)?;
    } else if save_t {
        assert_eq!(regime, regime_for(T::DTYPE, m), "the regime saving_t picks");
        fused_forward_saving_t(dev, dims, &xd, &wd, &adapter, &mut yd, &mut td)?;
    } else {
        fused_forward_in(regime, dev, dims, &xd, &wd, &adapter, beta, &mut yd)?;
    }

    // The reference: exact, with the control's scale, and on |inputs|.
    let forward = |(x, w, y): (&[f64], &[f64], &[f64]), a: &[f64], b: &[f64], scale, beta| {
        let mut y = y.to_vec();
        let adapter = Adapter { a, b, rank, scale };
        reference::fused_forward(dims, x, w, &adapter, beta, &mut y).map(|()| y)
    };
    let (x64, w64, a64, b64) = (wide(&x), wide(&w), wide(&a), wide(&b));
    let (xa, wa, aa, ba) = (abs(&x), abs(&w), abs(&a), abs(&b));
    let (y64, ya) = (wide(&y_old), abs(&y_old));
    let exact = (&x64[..], &w64[..], &y64[..]);
    let absolute = (&xa[..], &wa[..], &ya[..]);
    let want = forward(exact, &a64, &b64, scale, beta)?;
    let control = forward(exact, &a64, &b64, off::<T>(scale), beta)?;
    let abs_all = forward(absolute, &aa, &ba, scale.abs(), beta.abs())?;
    let abs_low = minus(&abs_all, &forward(absolute, &aa, &ba, 0.0, beta.abs())?);

    // beta y: a product and an addition more.
    let with_beta = if beta != 0.0 { 2 } else { 0 };
    let (y_model, path) = match regime {
        // The product, k additions into t, the scale, the product with b,
        // then r additions into y (after the base terms).
        Regime::Simt => (model::<T>(k + rank + 3 + with_beta), "Simt".to_string()),
        // Products of f16/bf16 are exact in f32: k additions into t, the
        // scale, then the hi and the lo expand, 2r additions into y.
        _ => (
            model::<T>(k + 2 * rank + 1 + with_beta)
                .mma(dev)
                .split::<T>(rank as f64 * max_abs(&b64)),
            match call {
                Forward::Wgmma => format!("{regime:?}, wgmma + TMA"),
                Forward::Direct => format!("{regime:?}, direct loads"),
                _ => format!("{regime:?}, {}", loads(k % 8 == 0)),
            },
        ),
    };
    let (op, y_path) = match call {
        Forward::Plain => ("fused_forward", path.clone()),
        Forward::Beta(beta) => ("fused_forward", format!("{path}, beta {beta}")),
        Forward::SavingT => ("fused_forward_saving_t", format!("{path}: y")),
        Forward::Wgmma | Forward::Direct => ("fused_forward", format!("{path}: y")),
    };
    let mut rows = vec![judged(
        label::<T>(op, y_path, shape(dims, rank)),
        &wide(&dev.download(&yd)?),
        &want,
        &control,
        &y_model.bounds(&want, &abs_all, &abs_low),
    )];

    if save_t {
        // t = x a^T, f32 and unscaled: no scale enters it, so its control is
        // t off by the same relative amount (as if a were).
        let zero_b = vec![0.0; n * rank];
        let t_of = |x: &[f64], a: &[f64]| -> Res<Vec<f64>> {
            let adapter = Adapter {
                a,
                b: &zero_b,
                rank,
                scale,
            };
            let t = reference::lora_intermediate(dims, x, &adapter)?;
            Ok(t.iter().map(|&v| v as f64).collect())
        };
        let want = t_of(&x64, &a64)?;
        let delta = control_delta(T::DTYPE);
        let control: Vec<f64> = want.iter().map(|v| v * (1.0 + delta)).collect();
        let abs_t = t_of(&xa, &aa)?;
        // The product (rounded for f32 inputs) and k additions; the one
        // rounding to f32 is the reference's.
        let mut t_model = model::<f32>(k + 1);
        if regime != Regime::Simt {
            t_model = t_model.mma(dev);
        }
        rows.push(judged(
            label::<T>(
                op,
                format!("{path}: t (f32; control: t)"),
                shape(dims, rank),
            ),
            &wide(&dev.download(&td)?),
            &want,
            &control,
            &t_model.bounds(&want, &abs_t, &vec![0.0; want.len()]),
        ));
    }
    Ok(rows)
}
