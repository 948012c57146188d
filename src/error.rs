//! The crate's one error type. Every public function validates its inputs and
//! returns one of these instead of panicking or launching on bad input.
use std::fmt;

/// Which backend a buffer or device belongs to (for mismatch errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cuda,
    Host,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cuda => "CUDA",
            Backend::Host => "host runtime",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer's length does not match the shape it must have.
    #[error("`{operand}` has the wrong size: expected {expected} elements ({shape}), got {actual}")]
    Shape {
        operand: &'static str,
        shape: String,
        expected: usize,
        actual: usize,
    },
    /// A dimension or scalar argument is outside its valid range.
    #[error("invalid `{name}` = {value}: {reason}")]
    InvalidArgument {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// A per-token adapter slot id names no slot.
    #[error(
        "slot id {id} for token {token} is out of range: valid ids are -1 (no adapter) and 0..{slots}"
    )]
    SlotOutOfRange { token: usize, id: i32, slots: usize },
    /// A token names a slot that holds no adapter.
    #[error(
        "slot {slot} for token {token} holds no adapter (load one, or use -1 for the base model only)"
    )]
    EmptySlot { token: usize, slot: i32 },
    /// A segment table (offsets into the token rows) is malformed.
    #[error("invalid segments: {0}")]
    Segments(String),
    /// The CUDA driver library could not be loaded.
    #[error("no CUDA driver: libcuda could not be loaded on this machine")]
    NoDriver,
    /// libcublas could not be loaded (only the cuBLAS baselines need it).
    #[error(
        "cuBLAS is not available: libcublas could not be loaded (add its folder to LD_LIBRARY_PATH)"
    )]
    NoCublas,
    /// No GPU with that ordinal.
    #[error("no CUDA device {ordinal}: {count} device(s) present")]
    NoDevice { ordinal: usize, count: usize },
    /// The crate was built without nvcc, so there is nothing to launch.
    #[error(
        "CUDA kernels were not built (nvcc was not found at build time); install the toolchain with \
         scripts/install-cuda-toolchain and rebuild"
    )]
    KernelsNotBuilt,
    /// The host runtime is not compiled in (cargo feature `host`).
    #[error("the host runtime is not compiled in: enable the `host` cargo feature")]
    HostRuntimeNotBuilt,
    /// No compiled image of a kernel fits the device.
    #[error("no compiled image of kernel `{kernel}` fits compute capability {major}.{minor}")]
    NoImage {
        kernel: &'static str,
        major: i32,
        minor: i32,
    },
    /// An operand lives on a different backend than the device running the op.
    #[error("`{operand}` is a {actual} buffer but the op runs on the {expected} backend")]
    BackendMismatch {
        operand: &'static str,
        expected: Backend,
        actual: Backend,
    },
    /// The host runtime rejected or aborted a launch (deadlock, divergent
    /// collectives, `__trap`, bad launch configuration).
    #[error("host launch of `{kernel}` failed: {message}")]
    HostLaunch {
        kernel: &'static str,
        message: String,
    },
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
