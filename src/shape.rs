//! Shapes and the validation every op (reference or kernel) runs first.
use crate::error::{Error, Result};

/// The largest adapter rank any op accepts.
pub const MAX_RANK: usize = 256;

/// Problem size of a linear layer: `x` is `[m, k]`, `w` is `[n, k]`, `y` is `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Tokens in the batch (rows of `x` and `y`); may be 0.
    pub m: usize,
    /// Output features (rows of `w`, columns of `y`).
    pub n: usize,
    /// Input features (columns of `x` and `w`).
    pub k: usize,
}

impl Dims {
    /// `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]`.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Dims { m, n, k }
    }

    /// `m` may be 0 (an empty batch); `n` and `k` must be positive; every
    /// dimension must fit the kernels' 32-bit indices.
    pub fn validate(&self) -> Result<()> {
        check_dim("m", self.m, 0)?;
        check_dim("n", self.n, 1)?;
        check_dim("k", self.k, 1)?;
        for (name, rows, cols) in [
            ("x", self.m, self.k),
            ("w", self.n, self.k),
            ("y", self.m, self.n),
        ] {
            elements(name, rows, cols)?;
        }
        Ok(())
    }
}

fn check_dim(name: &'static str, value: usize, min: usize) -> Result<()> {
    if value < min || value > i32::MAX as usize {
        return Err(invalid(
            name,
            value,
            format!("must be in {min}..={}", i32::MAX),
        ));
    }
    Ok(())
}

pub(crate) fn invalid(
    name: &'static str,
    value: impl ToString,
    reason: impl Into<String>,
) -> Error {
    Error::InvalidArgument {
        name,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// `rows * cols`, the element count of `operand`, or an error naming it
/// when the product overflows `usize` (it must never wrap: a wrapped count
/// would let a too-small buffer pass as the right size).
pub(crate) fn elements(operand: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| {
        invalid(
            operand,
            format!("{rows} x {cols}"),
            "element count overflows usize",
        )
    })
}

/// Checks that `operand` holds exactly `rows x cols` elements.
pub(crate) fn check_matrix(
    operand: &'static str,
    rows: usize,
    cols: usize,
    actual: usize,
) -> Result<()> {
    let expected = elements(operand, rows, cols)?;
    if actual != expected {
        return Err(Error::Shape {
            operand,
            shape: format!("{rows} x {cols}"),
            expected,
            actual,
        });
    }
    Ok(())
}

pub(crate) fn check_rank(name: &'static str, rank: usize) -> Result<()> {
    if !(1..=MAX_RANK).contains(&rank) {
        return Err(invalid(
            name,
            rank,
            format!("rank must be in 1..={MAX_RANK}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_finite(name: &'static str, value: f32) -> Result<()> {
    if !value.is_finite() {
        return Err(invalid(name, value, "must be finite"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_counts_that_overflow_are_errors_not_wraps() {
        // usize::MAX x 2 wraps to usize::MAX - 1: a buffer of that "size" must not pass.
        let err = check_matrix("x", usize::MAX, 2, usize::MAX - 1).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "x", .. }),
            "{err}"
        );
        assert!(check_matrix("x", 3, 2, 6).is_ok());
    }
}
