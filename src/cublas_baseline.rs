//! The baselines every benchmark and GPU test compares against (docs/DESIGN.md
//! section 4), through cudarc's cuBLAS, on the device's own stream:
//! 1. base only: `y = x w^T`, the cost of having no adapter at all;
//! 2. unfused LoRA, what PEFT does: base GEMM, shrink GEMM `t = x a^T` (stored
//!    in the storage type), expand GEMM `y += s t b^T` (beta = 1).
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use crate::device::Device;
use crate::element::Element;
use crate::error::{Backend, Error, Result};
use crate::shape::{Dims, check_finite, check_matrix, check_rank};

/// cuBLAS computing each operation the unfused way (separate GEMMs), on a
/// device's stream: what the kernels are benchmarked and cross-checked against.
pub struct CublasBaseline {
    blas: CudaBlas,
}

impl CublasBaseline {
    /// A cuBLAS handle on `dev`'s stream (CUDA devices only).
    pub fn new(dev: &Device) -> Result<Self> {
        let stream = dev.cuda_stream().ok_or(Error::BackendMismatch {
            operand: "device",
            expected: Backend::Cuda,
            actual: Backend::Host,
        })?;
        // cudarc panics on first use of a library it cannot load.
        if !crate::device::cuda_library_present("cublas", "cublas") {
            return Err(Error::NoCublas);
        }
        Ok(CublasBaseline {
            blas: CudaBlas::new(stream.clone())?,
        })
    }

    /// `c[rows, cols] = alpha * p[rows, inner] q[cols, inner]^T + beta * c`,
    /// all row-major: in cuBLAS's column-major terms `c^T = q p^T`.
    fn gemm_nt<T: Element>(
        &self,
        (rows, cols, inner): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        p: &impl DevicePtr<T>,
        q: &impl DevicePtr<T>,
        c: &mut impl DevicePtrMut<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: cols as i32,
            n: rows as i32,
            k: inner as i32,
            alpha: T::from_f32(alpha),
            lda: inner as i32,
            ldb: inner as i32,
            beta: T::from_f32(beta),
            ldc: cols as i32,
        };
        // SAFETY: callers checked p is rows x inner, q is cols x inner and c is
        // rows x cols elements, matching the leading dimensions above, and that
        // every dimension fits i32.
        unsafe { self.blas.gemm(cfg, q, p, c) }?;
        Ok(())
    }

    /// `y = x w^T`.
    pub fn base<T: Element>(
        &self,
        dims: Dims,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        dims.validate()?;
        check_matrix("x", dims.m, dims.k, x.len())?;
        check_matrix("w", dims.n, dims.k, w.len())?;
        check_matrix("y", dims.m, dims.n, y.len())?;
        if dims.m == 0 {
            return Ok(());
        }
        self.gemm_nt((dims.m, dims.n, dims.k), (1.0, 0.0), x, w, y)
    }

    /// `y = x w^T + scale (x a^T) b^T` as three GEMMs; `t` (`[m, rank]`) is the
    /// caller's scratch for the intermediate.
    #[allow(clippy::too_many_arguments)] // mirrors the op it is the baseline of
    pub fn unfused<T: Element>(
        &self,
        dims: Dims,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        (a, b, rank, scale): (&CudaSlice<T>, &CudaSlice<T>, usize, f32),
        t: &mut CudaSlice<T>,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        check_rank("rank", rank)?;
        check_finite("scale", scale)?;
        check_matrix("a", rank, dims.k, a.len())?;
        check_matrix("b", dims.n, rank, b.len())?;
        check_matrix("t", dims.m, rank, t.len())?;
        self.base(dims, x, w, y)?;
        if dims.m == 0 {
            return Ok(());
        }
        self.gemm_nt((dims.m, rank, dims.k), (1.0, 0.0), x, a, t)?;
        self.gemm_nt((dims.m, dims.n, rank), (scale, 1.0), &*t, b, y)
    }

    /// What Rust engines do today for a batch of many adapters: the base GEMM
    /// over all rows, then for each adapter a shrink and an expand GEMM over
    /// its rows (tokens sorted so each adapter's rows are contiguous).
    pub fn per_adapter_loop<T: Element>(
        &self,
        dims: Dims,
        x: &CudaView<'_, T>,
        w: &impl DevicePtr<T>,
        groups: &[AdapterRows<'_, T>],
        t: &mut CudaSlice<T>,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        self.base(dims, x, w, y)?;
        let Dims { m, n, k } = dims;
        for g in groups {
            check_rank("rank", g.rank)?;
            check_finite("scale", g.scale)?;
            check_matrix("a", g.rank, k, g.a.len())?;
            check_matrix("b", n, g.rank, g.b.len())?;
            let rows = g.rows.len();
            if g.rows.end > m || rows * g.rank > t.len() {
                return Err(crate::shape::invalid(
                    "rows",
                    format!("{:?}", g.rows),
                    "outside the batch or the t scratch",
                ));
            }
            if rows == 0 {
                continue;
            }
            let xs = x.slice(g.rows.start * k..g.rows.end * k);
            let mut ts = t.slice_mut(..rows * g.rank);
            self.gemm_nt((rows, g.rank, k), (1.0, 0.0), &xs, g.a, &mut ts)?;
            let mut ys = y.slice_mut(g.rows.start * n..g.rows.end * n);
            self.gemm_nt((rows, n, g.rank), (g.scale, 1.0), &ts, g.b, &mut ys)?;
        }
        Ok(())
    }

    /// Row-major `c[m, n] = alpha op(a) op(b) + beta c`, op = transpose when
    /// the flag is set (`a` is `[m, kk]` or, transposed, `[kk, m]`; `b` is
    /// `[kk, n]` or `[n, kk]`). In cuBLAS's column-major terms `c^T = op(b)^T op(a)^T`.
    #[allow(clippy::too_many_arguments)] // a GEMM's operands
    fn gemm_rm<T: Element>(
        &self,
        (m, n, kk): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        (a, a_t): (&impl DevicePtr<T>, bool),
        (b, b_t): (&impl DevicePtr<T>, bool),
        c: &mut impl DevicePtrMut<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        use cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        check_matrix("a", m, kk, a.len())?;
        check_matrix("b", kk, n, b.len())?;
        check_matrix("c", m, n, c.len())?;
        let cfg = GemmConfig {
            transa: if b_t { CUBLAS_OP_T } else { CUBLAS_OP_N },
            transb: if a_t { CUBLAS_OP_T } else { CUBLAS_OP_N },
            m: n as i32,
            n: m as i32,
            k: kk as i32,
            alpha: T::from_f32(alpha),
            lda: if b_t { kk as i32 } else { n as i32 },
            ldb: if a_t { m as i32 } else { kk as i32 },
            beta: T::from_f32(beta),
            ldc: n as i32,
        };
        // SAFETY: the sizes of a, b, c were checked against the shapes above,
        // which the leading dimensions follow.
        unsafe { self.blas.gemm(cfg, b, a, c) }?;
        Ok(())
    }

    /// `dx = g w` alone: the one GEMM an adapter backward can't avoid (its
    /// targets are ratios to it). `g` is `[m, n]`, `w` `[n, k]`, `dx` `[m, k]`.
    pub fn backward_base<T: Element>(
        &self,
        dims: Dims,
        g: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        dx: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        let Dims { m, n, k } = dims;
        dims.validate()?;
        check_matrix("g", m, n, g.len())?;
        check_matrix("w", n, k, w.len())?;
        check_matrix("dx", m, k, dx.len())?;
        if m == 0 {
            return Ok(());
        }
        self.gemm_rm((m, k, n), (1.0, 0.0), (g, false), (w, false), dx)
    }

    /// The unfused adapter backward, five GEMMs (docs/DESIGN.md section 1):
    /// `u = s g b`, `dx = g w`, `dx += u a`, `db = s g^T t`, `da = u^T x`,
    /// every result in the storage type. `t` is `[m, rank]` (the unfused
    /// forward's intermediate), `u` is `[m, rank]` scratch.
    #[allow(clippy::too_many_arguments)] // mirrors the op it is the baseline of
    pub fn backward_unfused<T: Element>(
        &self,
        dims: Dims,
        (g, x, w): (&impl DevicePtr<T>, &impl DevicePtr<T>, &impl DevicePtr<T>),
        (a, b, rank, scale): (&CudaSlice<T>, &CudaSlice<T>, usize, f32),
        t: &CudaSlice<T>,
        u: &mut CudaSlice<T>,
        (dx, da, db): (&mut CudaSlice<T>, &mut CudaSlice<T>, &mut CudaSlice<T>),
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        let Dims { m, n, k } = dims;
        dims.validate()?;
        check_rank("rank", rank)?;
        check_finite("scale", scale)?;
        self.gemm_rm((m, rank, n), (scale, 0.0), (g, false), (b, false), u)?;
        self.gemm_rm((m, k, n), (1.0, 0.0), (g, false), (w, false), dx)?;
        self.gemm_rm((m, k, rank), (1.0, 1.0), (&*u, false), (a, false), dx)?;
        self.gemm_rm((n, rank, m), (scale, 0.0), (g, true), (t, false), db)?;
        self.gemm_rm((rank, k, m), (1.0, 0.0), (&*u, true), (x, false), da)
    }
}

/// One adapter's rows of a batch, for [`CublasBaseline::per_adapter_loop`].
pub struct AdapterRows<'a, T> {
    /// The batch rows (tokens) that use this adapter.
    pub rows: Range<usize>,
    /// `[rank, k]`.
    pub a: &'a CudaSlice<T>,
    /// `[n, rank]`.
    pub b: &'a CudaSlice<T>,
    /// The adapter's rank.
    pub rank: usize,
    /// The adapter's scale.
    pub scale: f32,
}
