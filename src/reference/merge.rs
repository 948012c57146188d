use super::Adapter;
use crate::element::Element;
use crate::error::Result;
use crate::ops::merge::MergeOp;
use crate::shape::{Dims, check_matrix};

/// `w[n, k] <- w +/- s b a`, accumulated in f64 and rounded once to the
/// storage type. Unmerge after merge restores `w` up to that one rounding of
/// the merged weight: `|unmerge(merge(w)) - w| <= u |merge(w)|` plus one more
/// rounding of the result (`u` = unit roundoff), exact in f64.
pub fn merge<T: Element>(
    n: usize,
    k: usize,
    w: &mut [T],
    adapter: &Adapter<'_, T>,
    op: MergeOp,
) -> Result<()> {
    Dims::new(0, n, k).validate()?;
    check_matrix("w", n, k, w.len())?;
    adapter.validate(n, k)?;
    let sign = match op {
        MergeOp::Merge => 1.0,
        MergeOp::Unmerge => -1.0,
    };
    let (r, s) = (adapter.rank, adapter.scale as f64);
    for c in 0..n {
        for q in 0..k {
            let ba: f64 = (0..r)
                .map(|j| adapter.b[c * r + j].to_f64() * adapter.a[j * k + q].to_f64())
                .sum();
            w[c * k + q] = T::from_f64(w[c * k + q].to_f64() + sign * s * ba);
        }
    }
    Ok(())
}
