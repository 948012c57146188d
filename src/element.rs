//! Storage element types: f32, f16, bf16 (and f64, for reference checks).
use half::{bf16, f16};

/// Which storage type a kernel instance is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]).
    BF16,
    /// Double precision: the reference's type, no kernel takes it.
    F64,
}

impl DType {
    /// Suffix of kernel entry points for this type (`lk_<op>_<suffix>`).
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// A storage element: converts to f64 exactly and from f64 with one rounding.
pub trait Element: Copy + Send + Sync + Default + std::fmt::Debug + PartialEq + 'static {
    /// The type's tag.
    const DTYPE: DType;
    /// Unit roundoff of the type (half the distance from 1 to the next value).
    const UNIT_ROUNDOFF: f64;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounds an f64 to this type (to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Widening to f32 (exact for f16, bf16 and f32).
    fn to_f32(self) -> f32 {
        self.to_f64() as f32
    }
    /// Rounds an f32 to this type the way the kernels do (round to nearest even).
    fn from_f32(v: f32) -> Self;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    const UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    const UNIT_ROUNDOFF: f64 = 1.0 / 256.0;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
