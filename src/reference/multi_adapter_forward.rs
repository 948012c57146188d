use super::{Adapter, forward_row};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::shape::{Dims, check_finite, check_matrix};

/// Multi-adapter forward: token `i` uses `adapters[slot_ids[i]]`, or only the
/// base model when its id is `-1`. Adapters may have different ranks.
pub fn multi_adapter_forward<T: Element>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapters: &[Adapter<'_, T>],
    slot_ids: &[i32],
    beta: f32,
    y: &mut [T],
) -> Result<()> {
    validate(dims, x, w, adapters, beta, y.len())?;
    if slot_ids.len() != dims.m {
        return Err(Error::Shape {
            operand: "slot_ids",
            shape: format!("m = {}", dims.m),
            expected: dims.m,
            actual: slot_ids.len(),
        });
    }
    let chosen: Vec<Option<&Adapter<'_, T>>> = slot_ids
        .iter()
        .enumerate()
        .map(|(token, &id)| slot(adapters, token, id))
        .collect::<Result<_>>()?;
    for (i, adapter) in chosen.into_iter().enumerate() {
        forward_row(dims, x, w, adapter, beta, i, y);
    }
    Ok(())
}

/// The sorted-segment form used for prefill: tokens
/// `offsets[s]..offsets[s + 1]` all use slot `slots[s]` (`-1` = base only).
/// `offsets` has one more entry than `slots`, starts at 0, never decreases and
/// ends at `m`.
pub fn multi_adapter_forward_segments<T: Element>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapters: &[Adapter<'_, T>],
    segments: (&[i32], &[i32]),
    beta: f32,
    y: &mut [T],
) -> Result<()> {
    let ids = segment_ids(dims.m, segments.0, segments.1)?;
    multi_adapter_forward(dims, x, w, adapters, &ids, beta, y)
}

/// Expands a segment table into per-token slot ids, validating it. An empty
/// batch may have an empty table (`offsets = [0]`, `slots = []`).
pub fn segment_ids(m: usize, offsets: &[i32], slots: &[i32]) -> Result<Vec<i32>> {
    if offsets.len() != slots.len() + 1 {
        return Err(Error::Segments(format!(
            "offsets must have slots + 1 = {} entries, got {}",
            slots.len() + 1,
            offsets.len()
        )));
    }
    if slots.is_empty() && m > 0 {
        return Err(Error::Segments(format!(
            "m = {m} tokens need at least one segment (an empty table is for m = 0)"
        )));
    }
    if offsets[0] != 0 || *offsets.last().unwrap() as i64 != m as i64 {
        return Err(Error::Segments(format!(
            "offsets must start at 0 and end at m = {m}, got {} .. {}",
            offsets[0],
            offsets.last().unwrap()
        )));
    }
    let mut ids = Vec::with_capacity(m);
    for (s, pair) in offsets.windows(2).enumerate() {
        if pair[1] < pair[0] {
            return Err(Error::Segments(format!(
                "offsets decrease at segment {s}: {} > {}",
                pair[0], pair[1]
            )));
        }
        ids.extend(std::iter::repeat_n(slots[s], (pair[1] - pair[0]) as usize));
    }
    Ok(ids)
}

fn slot<'s, 'a, T>(
    adapters: &'s [Adapter<'a, T>],
    token: usize,
    id: i32,
) -> Result<Option<&'s Adapter<'a, T>>> {
    match id {
        -1 => Ok(None),
        id if id >= 0 && (id as usize) < adapters.len() => Ok(Some(&adapters[id as usize])),
        id => Err(Error::SlotOutOfRange {
            token,
            id,
            slots: adapters.len(),
        }),
    }
}

fn validate<T>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapters: &[Adapter<'_, T>],
    beta: f32,
    y_len: usize,
) -> Result<()> {
    dims.validate()?;
    check_matrix("x", dims.m, dims.k, x.len())?;
    check_matrix("w", dims.n, dims.k, w.len())?;
    for adapter in adapters {
        adapter.validate(dims.n, dims.k)?;
    }
    check_finite("beta", beta)?;
    check_matrix("y", dims.m, dims.n, y_len)
}
