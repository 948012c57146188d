//! The host runtime's own tests: its emulation of warp collectives and
//! fragment instructions gives the right answers, and planted bugs (a missing
//! barrier, a wrong fragment index, wrong ldmatrix rows, a missing cp.async
//! wait) each give a wrong answer on every run and under every schedule.
//! On a GPU the correct variants also run there, checking the emulated
//! fragment layouts against the hardware.

use super::{self as st, variant};
use crate::test_common::*;
use half::{bf16, f16};
use lora_kernels::{Device, Element, HostSchedule};

const SCHEDULES: [HostSchedule; 2] = [HostSchedule::Forward, HostSchedule::Reverse];

fn host() -> Device {
    Device::host().unwrap()
}

/// `dev` itself on a GPU; on the host runtime, the host runtime with schedule `s`.
fn scheduled(dev: &Device, s: HostSchedule) -> Device {
    match dev {
        Device::Host(_) => Device::host_with_schedule(s).unwrap(),
        gpu => gpu.clone(),
    }
}

fn neighbors_expected(input: &[f32]) -> Vec<f32> {
    (0..128)
        .map(|i| input[i] + input[(i / 64) * 64 + (i % 64 + 1) % 64])
        .collect()
}

fn mma_expected<T: Element>(a: &[T], bt: &[T]) -> Vec<f32> {
    (0..128)
        .map(|e| {
            let (row, col) = (e / 8, e % 8);
            (0..16)
                .map(|q| a[row * 16 + q].to_f64() * bt[col * 16 + q].to_f64())
                .sum::<f64>() as f32
        })
        .collect()
}

fn close(got: &[f32], want: &[f32]) -> Result<(), String> {
    compare("result", got, want, 1e-5, 1e-6)
}

#[test]
fn shared_memory_exchange_is_right_with_barriers() {
    let input: Vec<f32> = random(&mut rng(1), 128);
    for dev in devices() {
        for s in SCHEDULES {
            let got = st::smem_neighbors(&scheduled(&dev, s), &input, variant::CORRECT).unwrap();
            close(&got, &neighbors_expected(&input))
                .unwrap_or_else(|e| panic!("{} {s:?}: {e}", dev.name()));
        }
    }
}

fn warp_slots_expected(input: &[f32]) -> Vec<f32> {
    (0..128).map(|i| input[i] + input[i / 32 * 32]).collect()
}

/// Warps that each publish a value to their own lanes through shared memory
/// (warp barriers only) get the right answer under every schedule; warps
/// that share one slot between warp barriers get a wrong one when the warps
/// take turns (`HostSchedule::Interleaved`), on every run. (Forward and
/// Reverse run each warp to its end here, so they can't see it.)
#[test]
fn warps_sharing_memory_without_a_block_barrier_are_caught_when_they_take_turns() {
    let all = [
        HostSchedule::Forward,
        HostSchedule::Reverse,
        HostSchedule::Interleaved,
    ];
    for seed in 0..4 {
        let input: Vec<f32> = random(&mut rng(10 + seed), 128);
        let want = warp_slots_expected(&input);
        for dev in devices() {
            for s in all {
                let got = st::warp_slots(&scheduled(&dev, s), &input, variant::CORRECT).unwrap();
                close(&got, &want).unwrap_or_else(|e| panic!("{} {s:?}: {e}", dev.name()));
            }
        }
        let interleaved = Device::host_with_schedule(HostSchedule::Interleaved).unwrap();
        let got = st::warp_slots(&interleaved, &input, variant::SHARED_WARP_SLOT).unwrap();
        assert!(
            close(&got, &want).is_err(),
            "a slot shared by warps gave the right answer: the interleaved schedule missed the race"
        );
    }
}

#[test]
fn missing_barrier_is_caught_on_every_run() {
    for bug in [
        variant::MISSING_BARRIER_BEFORE_READ,
        variant::MISSING_BARRIER_BEFORE_REUSE,
    ] {
        for seed in 0..4 {
            let input: Vec<f32> = random(&mut rng(seed), 128);
            for s in SCHEDULES {
                let got = st::smem_neighbors(&scheduled(&host(), s), &input, bug).unwrap();
                assert!(
                    close(&got, &neighbors_expected(&input)).is_err(),
                    "variant {bug} under {s:?} gave the right answer: the runtime missed the race"
                );
            }
        }
    }
}

fn check_mma<T: Element + lora_kernels::KernelElement>() {
    let mut g = rng(7);
    let (a, bt): (Vec<T>, Vec<T>) = (random(&mut g, 256), random(&mut g, 128));
    let want = mma_expected(&a, &bt);
    for dev in devices() {
        let got = st::mma(&dev, &a, &bt, variant::CORRECT).unwrap();
        close(&got, &want).unwrap_or_else(|e| panic!("mma {:?} on {}: {e}", T::DTYPE, dev.name()));
    }
    let wrong = st::mma(&host(), &a, &bt, variant::WRONG_FRAGMENT_INDEX).unwrap();
    assert!(
        close(&wrong, &want).is_err(),
        "a swapped fragment register went unnoticed"
    );
}

#[test]
fn mma_f16_follows_the_fragment_layout() {
    check_mma::<f16>();
}

#[test]
fn mma_bf16_follows_the_fragment_layout() {
    check_mma::<bf16>();
}

#[test]
fn ldmatrix_feeds_mma_correctly_and_wrong_rows_are_caught() {
    let mut g = rng(9);
    let (a, bt): (Vec<f16>, Vec<f16>) = (random(&mut g, 256), random(&mut g, 128));
    let want = mma_expected(&a, &bt);
    for dev in devices() {
        let got = st::ldmatrix(&dev, &a, &bt, variant::CORRECT).unwrap();
        close(&got, &want).unwrap_or_else(|e| panic!("ldmatrix on {}: {e}", dev.name()));
    }
    let wrong = st::ldmatrix(&host(), &a, &bt, variant::WRONG_LDMATRIX_ROWS).unwrap();
    assert!(
        close(&wrong, &want).is_err(),
        "wrong ldmatrix rows went unnoticed"
    );
}

#[test]
fn shuffles_and_ballot_reduce_each_warp() {
    let warps = 3;
    let input: Vec<f32> = random(&mut rng(3), 32 * warps);
    let mut want = vec![0f32; 2 * warps];
    for w in 0..warps {
        let lanes = &input[32 * w..32 * (w + 1)];
        want[w] = lanes.iter().map(|&v| v as f64).sum::<f64>() as f32;
        want[warps + w] = lanes.iter().filter(|&&v| v > 0.0).count() as f32;
    }
    for dev in devices() {
        let got = st::warp_reduce(&dev, &input, warps, variant::CORRECT).unwrap();
        close(&got, &want).unwrap_or_else(|e| panic!("warp reduce on {}: {e}", dev.name()));
    }
}

#[test]
fn a_divergent_collective_is_reported_not_hung() {
    let input: Vec<f32> = random(&mut rng(4), 64);
    let err = st::warp_reduce(&host(), &input, 2, variant::DIVERGENT_SHUFFLE).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("lk_selftest_warp_reduce") && msg.contains("exited"),
        "{msg}"
    );
    // The runtime is usable again after a failed launch.
    st::warp_reduce(&host(), &input, 2, variant::CORRECT).unwrap();
}

#[test]
fn cp_async_zero_fills_tails_skips_unissued_copies_and_a_missing_wait_is_caught() {
    for n in [128usize, 125, 1] {
        let input: Vec<f32> = random(&mut rng(n as u64), n);
        let mut padded = input.clone();
        padded.resize(128, 0.0);
        // Thread t copies floats 4t..4t+4; those with t % 8 == 7 issue nothing.
        let staged = |i: usize| if (i / 4) % 8 == 7 { -1.0 } else { padded[i] };
        let want: Vec<f32> = (0..128).map(|i| staged((i + 4) % 128)).collect();
        for dev in devices() {
            let got = st::cp_async(&dev, &input, variant::CORRECT).unwrap();
            close(&got, &want).unwrap_or_else(|e| panic!("cp.async n={n} on {}: {e}", dev.name()));
        }
        let got = st::cp_async(&host(), &input, variant::MISSING_CP_ASYNC_WAIT).unwrap();
        assert!(
            close(&got, &want).is_err(),
            "a missing cp.async wait went unnoticed (n={n})"
        );
    }
}

/// The kernels' f16/bf16 conversions (host stand-ins, and the CUDA intrinsics
/// on a GPU) round to nearest even exactly like the `half` crate, across every
/// 16-bit pattern, ties, subnormals, overflow, Inf and NaN.
#[test]
fn storage_conversions_match_the_half_crate() {
    let mut inputs: Vec<f32> = (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect();
    inputs.extend((0..=u16::MAX).map(|b| bf16::from_bits(b).to_f32()));
    // Exact ties and their neighbours, around 1, subnormals and the overflow edges.
    for base in [1.0f32, 6.1e-5, 3.0e-8, 65504.0, 65520.0, 3.3e38, 1e-40] {
        let bits = base.to_bits();
        inputs.extend(
            (0..64u32).map(|d| f32::from_bits(bits.wrapping_add(d * 0x1000).wrapping_sub(0x20000))),
        );
        inputs.extend((0..64).map(|d| -f32::from_bits(bits + d)));
    }
    let mut g = rng(5);
    inputs.extend((0..20000).map(|_| f32::from_bits(rand::RngExt::random::<u32>(&mut g))));
    for dev in devices() {
        for dtype in [lora_kernels::DType::F16, lora_kernels::DType::BF16] {
            let got = st::round_trip(&dev, dtype, &inputs).unwrap();
            for (x, g) in inputs.iter().zip(&got) {
                let want = match dtype {
                    lora_kernels::DType::F16 => f16::from_f32(*x).to_f32(),
                    _ => bf16::from_f32(*x).to_f32(),
                };
                let same = (want.is_nan() && g.is_nan()) || want.to_bits() == g.to_bits();
                assert!(
                    same,
                    "{dtype:?} on {}: {x:e} ({:#010x}) -> {g:e}, expected {want:e}",
                    dev.name(),
                    x.to_bits()
                );
            }
        }
    }
}
