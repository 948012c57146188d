//! merge and unmerge.

use super::*;

pub(super) fn merge_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for op in [MergeOp::Merge, MergeOp::Unmerge] {
        rows.push(merge_one::<f32>(dev, op)?);
        rows.push(merge_one::<f16>(dev, op)?);
        rows.push(merge_one::<bf16>(dev, op)?);
    }
    Ok(rows)
}

/// w <- w +/- s b a on a copy of w.
fn merge_one<T: KernelElement>(dev: &Device, op: MergeOp) -> Res<Row> {
    let (n, k, rank) = (N, K_ANY, 8);
    let (w, a, b) = (
        data::<T>(n * k, 41),
        data::<T>(rank * k, 42),
        data::<T>(n * rank, 43),
    );
    let scale = balanced_scale(rank);
    let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
    let mut wd = dev.upload(&w)?;
    merge(
        dev,
        Dims::new(0, n, k),
        &mut wd,
        &DeviceAdapter::new(&ad, &bd, rank, scale),
        op,
    )?;

    let merged = |w: &[f64], a: &[f64], b: &[f64], scale, op| -> Res<Vec<f64>> {
        let mut w = w.to_vec();
        let adapter = Adapter { a, b, rank, scale };
        reference::merge(n, k, &mut w, &adapter, op)?;
        Ok(w)
    };
    let (w64, a64, b64) = (wide(&w), wide(&a), wide(&b));
    let want = merged(&w64, &a64, &b64, scale, op)?;
    let control = merged(&w64, &a64, &b64, off::<T>(scale), op)?;
    let abs_all = merged(&abs(&w), &abs(&a), &abs(&b), scale.abs(), MergeOp::Merge)?;
    // The products (rounded for f32), r additions, the scale, the add to w.
    let bound = model::<T>(rank + 3).bounds(&want, &abs_all, &vec![0.0; want.len()]);
    let label = label::<T>("merge", format!("{op:?}"), format!("-x{n}x{k}, r{rank}"));
    Ok(judged(
        label,
        &wide(&dev.download(&wd)?),
        &want,
        &control,
        &bound,
    ))
}
