//! GPU timing as docs/DESIGN.md section 4 asks: CUDA events around each run on the
//! device's stream, warm-up outside the timing, the median of many runs.
use cudarc::driver::sys::CUevent_flags;

use crate::device::Device;
use crate::error::{Backend, Error, Result};

/// Summary of one measured operation, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median over the timed runs.
    pub median_us: f64,
    /// Fastest timed run.
    pub min_us: f64,
    /// Timed runs (after the warm-ups).
    pub runs: usize,
}

/// Times `f` (which must only enqueue work on `dev`'s stream): `warmup` untimed
/// runs, then `runs` runs each between two events; returns median and min.
pub fn time_on_stream(
    dev: &Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    let stream = dev.cuda_stream().ok_or(Error::BackendMismatch {
        operand: "device",
        expected: Backend::Cuda,
        actual: Backend::Host,
    })?;
    for _ in 0..warmup {
        f()?;
    }
    let ctx = stream.context();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(stream)?;
        f()?;
        end.record(stream)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64 * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_us: times[times.len() / 2],
        min_us: times[0],
        runs: times.len(),
    })
}
