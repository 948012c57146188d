//! The host runtime's emulation of Hopper's asynchronous instructions:
//! wgmma over TMA-loaded operands in every swizzle mode, over operands the
//! threads stored, and with A from registers, gives the product; and each
//! planted bug (a wrong swizzle in a descriptor, accumulators read before
//! the wait, a wait on the wrong mbarrier parity, an expect_tx byte count
//! that is off, a missing fence.proxy.async or wgmma.fence, a wrong A
//! register) gives a wrong answer or a failed launch on every run and under
//! every schedule. On a Hopper GPU the correct forms run there too.

use super::{self as hs, K, N, ROWS, Staging, variant};
use crate::test_common::*;
use half::{bf16, f16};
use lora_kernels::{Device, Element, HostSchedule, KernelElement};

const SCHEDULES: [HostSchedule; 3] = [
    HostSchedule::Forward,
    HostSchedule::Reverse,
    HostSchedule::Interleaved,
];
const SWIZZLES: [u32; 4] = [0, 32, 64, 128];

/// The host runtime under every schedule, and a Hopper GPU when there is one.
fn targets() -> Vec<Device> {
    let mut devs: Vec<Device> = SCHEDULES
        .iter()
        .map(|&s| Device::host_with_schedule(s).unwrap())
        .collect();
    devs.extend(
        devices()
            .into_iter()
            .filter(|d| d.compute_capability() == Some((9, 0))),
    );
    devs
}

/// Checks `got` against `a b^T` element by element, within f32 accumulation
/// of the K exact products: K 2^-24 sum |a_k b_k| (the products of 16-bit
/// values are exact in f32; only the sum rounds).
fn check<T: Element>(got: &[f32], a: &[T], b: &[T]) -> Result<(), String> {
    for row in 0..ROWS {
        for col in 0..N {
            let terms = (0..K).map(|k| a[row * K + k].to_f64() * b[col * K + k].to_f64());
            let (want, size) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
            let bound = K as f64 * f64::from(f32::EPSILON) / 2.0 * size;
            let g = f64::from(got[row * N + col]);
            // Written so that NaN fails too.
            let within = (g - want).abs() <= bound;
            if !within {
                return Err(format!(
                    "out[{row}][{col}] = {g:e}, expected {want:e} (bound {bound:e})"
                ));
            }
        }
    }
    Ok(())
}

fn operands<T: Element>(seed: u64) -> (Vec<T>, Vec<T>) {
    let mut g = rng(seed);
    (random(&mut g, ROWS * K), random(&mut g, N * K))
}

fn correct_on_every_target<T: KernelElement>(staging: Staging, seed: u64) {
    let (a, b) = operands::<T>(seed);
    for dev in targets() {
        let got = hs::wgmma(&dev, staging, &a, &b, variant::CORRECT)
            .unwrap_or_else(|e| panic!("{staging:?} {:?} on {}: {e}", T::DTYPE, dev.name()));
        check(&got, &a, &b)
            .unwrap_or_else(|e| panic!("{staging:?} {:?} on {}: {e}", T::DTYPE, dev.name()));
    }
}

#[test]
fn tma_loads_and_wgmma_give_the_product_in_every_swizzle_mode() {
    for (i, swizzle) in SWIZZLES.into_iter().enumerate() {
        correct_on_every_target::<f16>(Staging::Tma { swizzle }, 10 + i as u64);
        correct_on_every_target::<bf16>(Staging::Tma { swizzle }, 20 + i as u64);
    }
}

#[test]
fn operands_the_threads_store_and_a_from_registers_give_the_product() {
    for staging in [Staging::Stores, Staging::RegisterA] {
        correct_on_every_target::<f16>(staging, 30);
        correct_on_every_target::<bf16>(staging, 31);
    }
}

/// The check is no formality: one element off by a part in 10^4 fails it.
#[test]
fn the_check_rejects_a_result_slightly_off() {
    let (a, b) = operands::<bf16>(40);
    let mut got = hs::wgmma(
        &Device::host().unwrap(),
        Staging::Stores,
        &a,
        &b,
        variant::CORRECT,
    )
    .unwrap();
    check(&got, &a, &b).unwrap();
    let e = 17 * N + 5;
    got[e] *= 1.0001;
    assert!(check(&got, &a, &b).is_err());
}

/// Runs a planted bug on the host runtime under every schedule: each run
/// must fail the launch or give a wrong answer. Returns the failures' messages.
fn caught<T: KernelElement>(staging: Staging, bug: i32, seed: u64) -> Vec<String> {
    let (a, b) = operands::<T>(seed);
    let mut errors = Vec::new();
    for s in SCHEDULES {
        let dev = Device::host_with_schedule(s).unwrap();
        match hs::wgmma(&dev, staging, &a, &b, bug) {
            Err(e) => errors.push(e.to_string()),
            Ok(got) => assert!(
                check(&got, &a, &b).is_err(),
                "planted bug {bug} ({staging:?}, {:?}, {s:?}) went unnoticed",
                T::DTYPE
            ),
        }
        // The runtime is usable again after a failed launch.
        let good = hs::wgmma(&dev, staging, &a, &b, variant::CORRECT).unwrap();
        check(&good, &a, &b).unwrap();
    }
    errors
}

#[test]
fn a_descriptor_with_another_swizzle_than_tma_wrote_is_caught() {
    for swizzle in SWIZZLES {
        caught::<bf16>(Staging::Tma { swizzle }, variant::WRONG_SWIZZLE, 50);
        caught::<f16>(Staging::Tma { swizzle }, variant::WRONG_SWIZZLE, 51);
    }
}

#[test]
fn accumulators_read_before_the_wait_are_caught() {
    for swizzle in SWIZZLES {
        caught::<bf16>(
            Staging::Tma { swizzle },
            variant::ACCUMULATORS_BEFORE_WAIT,
            52,
        );
    }
}

#[test]
fn a_wait_on_the_wrong_mbarrier_parity_is_caught() {
    for swizzle in SWIZZLES {
        caught::<bf16>(Staging::Tma { swizzle }, variant::WRONG_PARITY, 53);
    }
}

#[test]
fn an_expect_tx_byte_count_that_is_off_is_caught_either_way() {
    for swizzle in SWIZZLES {
        let short = caught::<bf16>(Staging::Tma { swizzle }, variant::EXPECT_TX_SHORT, 54);
        assert_eq!(short.len(), SCHEDULES.len(), "{short:?}");
        assert!(
            short
                .iter()
                .all(|m| m.contains("more than expect_tx announced")),
            "{short:?}"
        );
        // Too many bytes announced: the phase never completes.
        let long = caught::<bf16>(Staging::Tma { swizzle }, variant::EXPECT_TX_LONG, 55);
        assert_eq!(long.len(), SCHEDULES.len(), "{long:?}");
        assert!(
            long.iter()
                .all(|m| m.contains("deadlock") && m.contains("announced bytes not landed")),
            "{long:?}"
        );
    }
}

#[test]
fn stores_without_fence_proxy_async_are_caught() {
    for staging in [Staging::Stores, Staging::RegisterA] {
        caught::<bf16>(staging, variant::MISSING_PROXY_FENCE, 56);
        caught::<f16>(staging, variant::MISSING_PROXY_FENCE, 57);
    }
}

#[test]
fn a_wgmma_without_wgmma_fence_is_refused() {
    let errors = caught::<bf16>(Staging::Stores, variant::MISSING_WGMMA_FENCE, 58);
    assert_eq!(errors.len(), SCHEDULES.len(), "{errors:?}");
    assert!(
        errors.iter().all(|m| m.contains("without a wgmma.fence")),
        "{errors:?}"
    );
}

#[test]
fn a_wrong_a_register_is_caught() {
    caught::<bf16>(Staging::RegisterA, variant::WRONG_FRAGMENT_INDEX, 59);
    caught::<f16>(Staging::RegisterA, variant::WRONG_FRAGMENT_INDEX, 60);
}

#[test]
fn bad_input_is_refused_with_the_operand_named() {
    let dev = Device::host().unwrap();
    let (a, b) = operands::<bf16>(61);
    let err = hs::wgmma(&dev, Staging::Stores, &a[1..], &b, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`a`") || err.contains(" a "), "{err}");
    let err = hs::wgmma(&dev, Staging::Stores, &a, &b[..N], 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains('b'), "{err}");
    let err = hs::wgmma(&dev, Staging::Tma { swizzle: 16 }, &a, &b, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("swizzle"), "{err}");
    let f: Vec<f32> = random(&mut rng(62), ROWS * K);
    let err = hs::wgmma(&dev, Staging::Stores, &f, &f, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dtype"), "{err}");
}
