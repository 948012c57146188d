//! The crate's one error type. Every public function validates its inputs and
//! returns one of these instead of panicking or launching on bad input.
use std::fmt;

/// Which backend a buffer or device belongs to (for mismatch errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A GPU through the CUDA driver.
    Cuda,
    /// The host runtime (CPU).
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

/// Everything that can go wrong in the crate. Input errors name the operand
/// and say what was expected; a call that returns one has changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer's length does not match the shape it must have.
    #[error("`{operand}` has the wrong size: expected {expected} elements ({shape}), got {actual}")]
    Shape {
        /// Which operand.
        operand: &'static str,
        /// The shape it must have, e.g. `"16 x 4096"`.
        shape: String,
        /// Elements that shape holds.
        expected: usize,
        /// Elements the buffer holds.
        actual: usize,
    },
    /// A dimension or scalar argument is outside its valid range.
    #[error("invalid `{name}` = {value}: {reason}")]
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// Its value, as given.
        value: String,
        /// What a valid value is.
        reason: String,
    },
    /// A per-token adapter slot id names no slot.
    #[error(
        "slot id {id} for token {token} is out of range: valid ids are -1 (no adapter) and 0..{slots}"
    )]
    SlotOutOfRange {
        /// The token's index in the batch.
        token: usize,
        /// The id it gave.
        id: i32,
        /// Slots in the pool.
        slots: usize,
    },
    /// A token names a slot that holds no adapter.
    #[error(
        "slot {slot} for token {token} holds no adapter (load one, or use -1 for the base model only)"
    )]
    EmptySlot {
        /// The token's index in the batch.
        token: usize,
        /// The empty slot it named.
        slot: i32,
    },
    /// A weight meant for an adapter pool is NaN or +/-Inf. None may enter a
    /// pool: the kernels multiply other adapters' rows by exact zeros, and
    /// 0 * NaN = NaN would reach every token of the batch.
    #[error("`{operand}` holds {value} at index {index}: adapter weights must be finite")]
    NonFinite {
        /// Which operand.
        operand: &'static str,
        /// The first non-finite element's index.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A finite f32 weight becomes +/-Inf when rounded to the pool's storage
    /// type (f16: |v| >= 65520).
    #[error(
        "`{operand}` holds {value} at index {index}, outside the range of the pool's type {dtype:?} \
         (it would be stored as Inf)"
    )]
    OutOfRange {
        /// Which operand.
        operand: &'static str,
        /// The first such element's index.
        index: usize,
        /// Its value.
        value: f32,
        /// The storage type it overflows.
        dtype: crate::element::DType,
    },
    /// A slot the optimizer trains was loaded or evicted through the pool
    /// since the optimizer loaded it: a step would overwrite the pool's
    /// adapter with the optimizer's weights, so it is refused.
    #[error(
        "slot {slot} was loaded or evicted through the pool since the optimizer loaded it: a step \
         would overwrite it with the optimizer's weights. Load it with SlotOptimizer::load_adapter \
         or deactivate it with set_active({slot}, false)"
    )]
    SlotChanged {
        /// The slot.
        slot: usize,
    },
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
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// GPUs the driver sees.
        count: usize,
    },
    /// The crate was built without nvcc, so there is nothing to launch.
    #[error(
        "this build of lora-kernels has no CUDA kernels: nvcc was not found when the crate was compiled. \
         Install a CUDA toolkit with nvcc 13.x (or the PyPI wheels listed in docs/DESIGN.md section 7), \
         set NVCC=/path/to/nvcc or CUDA_HOME=/path/to/toolkit, and build again: the crate rebuilds when \
         either variable changes. The host runtime works without nvcc."
    )]
    KernelsNotBuilt,
    /// The host runtime is not compiled in (cargo feature `host`).
    #[error("the host runtime is not compiled in: enable the `host` cargo feature")]
    HostRuntimeNotBuilt,
    /// No compiled image of a kernel fits the device.
    #[error("no compiled image of kernel `{kernel}` fits compute capability {major}.{minor}")]
    NoImage {
        /// The kernel file.
        kernel: &'static str,
        /// The GPU's compute capability, major.
        major: i32,
        /// The GPU's compute capability, minor.
        minor: i32,
    },
    /// An operand lives on a different backend than the device running the op.
    #[error("`{operand}` is a {actual} buffer but the op runs on the {expected} backend")]
    BackendMismatch {
        /// Which operand.
        operand: &'static str,
        /// The device's backend.
        expected: Backend,
        /// The operand's backend.
        actual: Backend,
    },
    /// An operand lives in another CUDA context than the device running the
    /// op (made on another GPU, or in another context of the same GPU).
    #[error(
        "`{operand}` belongs to another CUDA context than the device the op runs on (it was made on another device)"
    )]
    ContextMismatch {
        /// Which operand.
        operand: &'static str,
    },
    /// The host runtime rejected or aborted a launch (deadlock, divergent
    /// collectives, `__trap`, bad launch configuration).
    #[error("host launch of `{kernel}` failed: {message}")]
    HostLaunch {
        /// The kernel entry point.
        kernel: &'static str,
        /// What the runtime reported.
        message: String,
    },
    /// A PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
    /// is malformed, disagrees with itself or with the pools it is loaded
    /// into, or asks for something the kernels don't compute.
    #[error("{file}: `{key}`: {reason}")]
    Peft {
        /// The file (adapter_config.json or adapter_model.safetensors, with its
        /// directory when read from disk).
        file: String,
        /// The JSON field or tensor key at fault.
        key: String,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// An error from the CUDA driver (through cudarc).
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// An error from cuBLAS (the baselines only).
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
