//! The host runtime's emulation of Hopper's asynchronous instructions:
//! wgmma over TMA-loaded operands in every swizzle mode (with TMA's
//! out-of-bounds zero fill; B K-major and MN-major), over operands the threads stored, and with A
//! from registers, in every N of the wgmma forms, gives the product; and each
//! planted bug (a wrong swizzle in a descriptor, accumulators read before
//! the wait, a wait on the wrong mbarrier parity, an expect_tx byte count
//! that is off, a missing fence.proxy.async or wgmma.fence, a wrong A
//! register, an MN-major B with its strides swapped or read K-major) gives a wrong answer or a failed launch on every run and under
//! every schedule. On a Hopper GPU the correct forms run there too.
use super::{self as hs, ROWS, Shape, Staging, variant};
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
/// of the k exact products: k 2^-24 sum |a_i b_i| (the products of 16-bit
/// values are exact in f32; only the sum rounds). Columns past B's rows must be 0.
fn check<T: Element>(got: &[f32], shape: Shape, a: &[T], b: &[T]) -> Result<(), String> {
    let Shape { n, k, b_rows } = shape;
    for row in 0..ROWS {
        for col in 0..n {
            let terms = (0..k)
                .filter(|_| col < b_rows)
                .map(|i| a[row * k + i].to_f64() * b[col * k + i].to_f64());
            let (want, size) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
            let bound = k as f64 * f64::from(f32::EPSILON) / 2.0 * size;
            let g = f64::from(got[row * n + col]);
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

fn operands<T: Element>(shape: Shape, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut g = rng(seed);
    (
        random(&mut g, ROWS * shape.k),
        random(&mut g, shape.b_rows * shape.k),
    )
}

fn correct_on_every_target<T: KernelElement>(staging: Staging, shape: Shape, seed: u64) {
    let (a, b) = operands::<T>(shape, seed);
    for dev in targets() {
        let what = || format!("{staging:?} {shape:?} {:?} on {}", T::DTYPE, dev.name());
        let got = hs::wgmma(&dev, staging, shape, &a, &b, variant::CORRECT)
            .unwrap_or_else(|e| panic!("{}: {e}", what()));
        check(&got, shape, &a, &b).unwrap_or_else(|e| panic!("{}: {e}", what()));
    }
}

#[test]
fn tma_loads_and_wgmma_give_the_product_in_every_swizzle_mode() {
    // The full boxes, and boxes past the end of k and of B's rows (zero fill).
    let partial = Shape {
        n: 64,
        k: 120,
        b_rows: 50,
    };
    for (i, swizzle) in SWIZZLES.into_iter().enumerate() {
        for shape in [Shape::FULL, partial] {
            correct_on_every_target::<f16>(Staging::Tma { swizzle }, shape, 10 + i as u64);
            correct_on_every_target::<bf16>(Staging::Tma { swizzle }, shape, 20 + i as u64);
        }
    }
}

#[test]
fn tma_loads_of_an_mn_major_b_give_the_product_in_every_swizzle_mode() {
    // B from its [k][n] transpose; past the end of k and of B's n (zero fill).
    let partial = Shape {
        n: 64,
        k: 120,
        b_rows: 56,
    };
    for (i, swizzle) in SWIZZLES.into_iter().enumerate() {
        for shape in [Shape::FULL, partial] {
            let staging = Staging::TmaBMnMajor { swizzle };
            correct_on_every_target::<f16>(staging, shape, 70 + i as u64);
            correct_on_every_target::<bf16>(staging, shape, 80 + i as u64);
        }
    }
}

#[test]
fn an_mn_major_b_with_swapped_strides_another_swizzle_or_read_k_major_is_caught() {
    for (i, swizzle) in SWIZZLES.into_iter().enumerate() {
        let staging = Staging::TmaBMnMajor { swizzle };
        let seed = 90 + 3 * i as u64;
        caught::<bf16>(staging, variant::SWAPPED_STRIDES, seed);
        caught::<f16>(staging, variant::WRONG_MAJOR, seed + 1);
        caught::<bf16>(staging, variant::WRONG_SWIZZLE, seed + 2);
    }
}

#[test]
fn every_wgmma_form_gives_the_product_from_stores_and_from_registers() {
    for n in [8, 16, 32, 64, 128, 256] {
        let full = Shape {
            n,
            k: 128,
            b_rows: n,
        };
        let partial = Shape {
            n,
            k: 77,
            b_rows: n - 3,
        };
        for (shape, seed) in [(full, 30), (partial, 32)] {
            for staging in [Staging::Stores, Staging::RegisterA] {
                correct_on_every_target::<f16>(staging, shape, seed);
                correct_on_every_target::<bf16>(staging, shape, seed + 1);
            }
        }
    }
}

/// The check is no formality: one element off by a part in 10^4 fails it.
#[test]
fn the_check_rejects_a_result_slightly_off() {
    let shape = Shape::FULL;
    let (a, b) = operands::<bf16>(shape, 40);
    let dev = Device::host().unwrap();
    let mut got = hs::wgmma(&dev, Staging::Stores, shape, &a, &b, variant::CORRECT).unwrap();
    check(&got, shape, &a, &b).unwrap();
    got[17 * shape.n + 5] *= 1.0001;
    assert!(check(&got, shape, &a, &b).is_err());
}

/// Runs a planted bug on the host runtime under every schedule: each run
/// must fail the launch or give a wrong answer. Returns the failures' messages.
fn caught<T: KernelElement>(staging: Staging, bug: i32, seed: u64) -> Vec<String> {
    let shape = Shape::FULL;
    let (a, b) = operands::<T>(shape, seed);
    let mut errors = Vec::new();
    for s in SCHEDULES {
        let dev = Device::host_with_schedule(s).unwrap();
        match hs::wgmma(&dev, staging, shape, &a, &b, bug) {
            Err(e) => errors.push(e.to_string()),
            Ok(got) => assert!(
                check(&got, shape, &a, &b).is_err(),
                "planted bug {bug} ({staging:?}, {:?}, {s:?}) went unnoticed",
                T::DTYPE
            ),
        }
        // The runtime is usable again after a failed launch.
        let good = hs::wgmma(&dev, staging, shape, &a, &b, variant::CORRECT).unwrap();
        check(&good, shape, &a, &b).unwrap();
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
    let full = Shape::FULL;
    let (a, b) = operands::<bf16>(full, 61);
    let refused = |staging, shape: Shape, a: &[bf16], b: &[bf16], what: &str| {
        let err = hs::wgmma(&dev, staging, shape, a, b, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{what}: {err}");
    };
    refused(Staging::Stores, full, &a[1..], &b, "`a`");
    refused(Staging::Stores, full, &a, &b[..64], "`b`");
    refused(Staging::Tma { swizzle: 16 }, full, &a, &b, "`swizzle`");
    let mn_major = Staging::TmaBMnMajor { swizzle: 128 };
    let (a50, b50) = operands::<bf16>(Shape { b_rows: 50, ..full }, 63);
    refused(
        mn_major,
        Shape { b_rows: 50, ..full },
        &a50,
        &b50,
        "`b_rows`",
    );
    let tma = Staging::Tma { swizzle: 0 };
    refused(tma, Shape { n: 128, ..full }, &a, &b, "`n`");
    refused(Staging::Stores, Shape { n: 24, ..full }, &a, &b, "`n`");
    refused(tma, Shape { k: 100, ..full }, &a, &b, "`k`");
    refused(Staging::Stores, Shape { k: 129, ..full }, &a, &b, "`k`");
    refused(
        Staging::Stores,
        Shape { b_rows: 65, ..full },
        &a,
        &b,
        "`b_rows`",
    );
    let f: Vec<f32> = random(&mut rng(62), ROWS * full.k);
    let err = hs::wgmma(&dev, Staging::Stores, full, &f, &f, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`dtype`"), "{err}");
}
