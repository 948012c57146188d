//! Bad input gets a clear `Err` naming the operand, never a panic or a launch.
mod common;

use common::*;
use lora_kernels::ops::fused_forward::fused_forward;
use lora_kernels::reference::{self, AdamW, AdamWState, Adapter, BackwardInputs, Gradients};
use lora_kernels::{Device, DeviceAdapter, Dims, Error, MergeOp};

fn data(len: usize) -> Vec<f32> {
    random(&mut rng(len as u64), len)
}

/// Runs the op on the host runtime with one operand's length changed.
fn forward_with(
    dims: Dims,
    sizes: [usize; 5],
    rank: usize,
    scale: f32,
    beta: f32,
) -> lora_kernels::Result<()> {
    let dev = Device::host().unwrap();
    let [x, w, a, b, y] = sizes.map(data);
    let mut y = y;
    let adapter = DeviceAdapter::new(&a, &b, rank, scale);
    fused_forward(&dev, dims, &x, &w, &adapter, beta, &mut y)
}

fn good_sizes(dims: Dims, r: usize) -> [usize; 5] {
    [
        dims.m * dims.k,
        dims.n * dims.k,
        r * dims.k,
        dims.n * r,
        dims.m * dims.n,
    ]
}

#[test]
fn wrong_operand_sizes_name_the_operand() {
    let dims = Dims::new(3, 5, 7);
    forward_with(dims, good_sizes(dims, 2), 2, 1.0, 0.0).unwrap();
    for (i, name) in ["x", "w", "a", "b", "y"].into_iter().enumerate() {
        let mut sizes = good_sizes(dims, 2);
        sizes[i] += 1;
        match forward_with(dims, sizes, 2, 1.0, 0.0) {
            Err(Error::Shape {
                operand,
                expected,
                actual,
                ..
            }) => {
                assert_eq!((operand, actual), (name, expected + 1));
            }
            other => panic!("{name} one too long: expected a shape error, got {other:?}"),
        }
        // The same through the reference.
        let [x, w, a, b, mut y] = sizes.map(data);
        let err = reference::fused_forward(
            dims,
            &x,
            &w,
            &Adapter {
                a: &a,
                b: &b,
                rank: 2,
                scale: 1.0,
            },
            0.0,
            &mut y,
        )
        .unwrap_err();
        assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
    }
}

#[test]
fn bad_ranks_dims_and_scalars_are_rejected() {
    let dims = Dims::new(2, 4, 4);
    for rank in [0, lora_kernels::MAX_RANK + 1] {
        let err = forward_with(dims, good_sizes(dims, rank), rank, 1.0, 0.0).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: "rank", .. }),
            "{err}"
        );
    }
    for (scale, beta, name) in [(f32::NAN, 0.0, "scale"), (1.0, f32::INFINITY, "beta")] {
        let err = forward_with(dims, good_sizes(dims, 2), 2, scale, beta).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { name: n, .. } if n == name),
            "{err}"
        );
    }
    for bad in [
        Dims::new(2, 0, 4),
        Dims::new(2, 4, 0),
        Dims::new(1 << 31, 1, 1),
    ] {
        let err = bad.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
}

#[test]
fn buffers_on_another_backend_are_rejected() {
    let Some(gpu) = gpu() else { return };
    let dims = Dims::new(2, 3, 4);
    let [x, w, a, b, y] = good_sizes(dims, 1).map(data);
    let mut y_host = y.clone();
    let a_dev = gpu.upload(&a).unwrap();
    let adapter = DeviceAdapter::new(&a_dev, &b, 1, 1.0);
    let err = fused_forward(
        &Device::host().unwrap(),
        dims,
        &x,
        &w,
        &adapter,
        0.0,
        &mut y_host,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::BackendMismatch { operand: "a", .. }),
        "{err}"
    );
}

#[test]
fn out_of_range_slot_ids_and_bad_segments_are_rejected() {
    let dims = Dims::new(3, 2, 2);
    let [x, w, a, b, mut y] = good_sizes(dims, 1).map(data);
    let adapters = [Adapter {
        a: &a,
        b: &b,
        rank: 1,
        scale: 1.0,
    }];
    for ids in [[0, 1, -1], [0, -2, 0]] {
        let err = reference::multi_adapter_forward(dims, &x, &w, &adapters, &ids, 0.0, &mut y)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::SlotOutOfRange {
                    token: 1,
                    slots: 1,
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = reference::multi_adapter_forward(dims, &x, &w, &adapters, &[0, 0], 0.0, &mut y)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                operand: "slot_ids",
                ..
            }
        ),
        "{err}"
    );
    for (offsets, slots) in [
        (&[0, 3][..], &[0, 0][..]),
        (&[1, 3], &[0]),
        (&[0, 2], &[0]),
        (&[0, 2, 1, 3], &[0, 0, 0]),
    ] {
        let err = reference::multi_adapter_forward_segments(
            dims,
            &x,
            &w,
            &adapters,
            (offsets, slots),
            0.0,
            &mut y,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Segments(_)), "{offsets:?}: {err}");
    }
}

#[test]
fn backward_merge_and_optimizer_validate_their_operands() {
    let dims = Dims::new(2, 3, 4);
    let [x, w, a, b, g] = good_sizes(dims, 2).map(data);
    let t = vec![0.5f32; 2 * 2];
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank: 2,
        scale: 1.0,
    };
    let mut db = vec![0f32; 3 * 2 + 1];
    let inputs = BackwardInputs {
        g: &g,
        x: &x,
        w: &w,
        adapter,
        t: &t,
    };
    let err = reference::backward(
        dims,
        &inputs,
        Gradients {
            db: Some(&mut db),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "db", .. }), "{err}");
    let short_t = [0.5f32; 3];
    let inputs = BackwardInputs {
        t: &short_t,
        ..inputs
    };
    let err = reference::backward(dims, &inputs, Gradients::default()).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "t", .. }), "{err}");

    let mut w_short = w[..11].to_vec();
    let err = reference::merge(3, 4, &mut w_short, &adapter, MergeOp::Merge).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "w", .. }), "{err}");

    let (mut p, mut m1, mut m2, mut work) =
        (vec![0f32; 4], vec![0f32; 4], vec![0f32; 3], vec![0f32; 4]);
    let state = AdamWState {
        p: &mut p,
        m1: &mut m1,
        m2: &mut m2,
        working: &mut work,
    };
    let err = reference::adamw_step(&AdamW::default(), 1, &[0.0; 4], state).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "m2", .. }), "{err}");
    let state = AdamWState {
        p: &mut p,
        m1: &mut m1,
        m2: &mut [0f32; 4],
        working: &mut work,
    };
    let err = reference::adamw_step(&AdamW::default(), 0, &[0.0; 4], state).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "step", .. }),
        "{err}"
    );
    let bad = AdamW {
        beta1: 1.0,
        ..AdamW::default()
    };
    let state = AdamWState {
        p: &mut p,
        m1: &mut m1,
        m2: &mut [0f32; 4],
        working: &mut work,
    };
    let err = reference::adamw_step(&bad, 1, &[0.0; 4], state).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "beta1", .. }),
        "{err}"
    );
}

#[test]
fn missing_driver_or_device_is_an_error_not_a_panic() {
    match Device::cuda(0) {
        Ok(_) => {
            let err = Device::cuda(10_000)
                .err()
                .expect("no machine has 10000 GPUs");
            assert!(
                matches!(
                    err,
                    Error::NoDevice {
                        ordinal: 10_000,
                        ..
                    }
                ),
                "{err}"
            );
        }
        Err(err) => {
            eprintln!("no GPU here: {err}");
            assert!(
                matches!(err, Error::NoDriver | Error::NoDevice { .. }),
                "{err}"
            );
        }
    }
}

#[test]
fn training_ops_validate_their_operands() {
    use lora_kernels::ops::adamw::SlotOptimizer;
    use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper};
    use lora_kernels::ops::lora_backward::{
        BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
    };
    use lora_kernels::ops::merge::merge;
    use lora_kernels::{AdapterPool, PoolConfig};
    let dev = Device::host().unwrap();
    let dims = Dims::new(4, 6, 5);
    let [x, w, a, b, g] = [20, 30, 10, 12, 24].map(data);
    let adapter = DeviceAdapter::new(&a, &b, 2, 1.0);
    let mut scratch = BackwardScratch::new(&dev).unwrap();
    let t = vec![0.5f32; 8];
    let mut db = vec![0f32; 13];
    let grads = Grads {
        dx: None,
        da: None,
        db: Some((&mut db).into()),
    };
    let err = lora_backward(
        &dev,
        dims,
        &adapter,
        DeviceBackwardInputs::new(&g, &x, &w, &t),
        grads,
        BackwardOptions::default(),
        &mut scratch,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "db", .. }), "{err}");
    let grads = Grads {
        dx: None,
        da: None,
        db: None,
    };
    let err = lora_backward(
        &dev,
        dims,
        &adapter,
        DeviceBackwardInputs::new(&g, &x, &w, &t[..7]),
        grads,
        BackwardOptions::default(),
        &mut scratch,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "t", .. }), "{err}");

    let mut w_short = w[..29].to_vec();
    let err = merge(&dev, dims, &mut w_short, &adapter, MergeOp::Merge).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "w", .. }), "{err}");

    let cfg = PoolConfig {
        slots: 2,
        max_rank: 2,
        n: 6,
        k: 5,
    };
    let mut pool = AdapterPool::<half::bf16>::new(&dev, cfg).unwrap();
    let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
    let hyper = SlotHyper {
        lr: -1.0,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        anchor_pull: 0.0,
    };
    let err = opt.set_hyper(0, hyper).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "lr", .. }),
        "{err}"
    );
    let err = opt
        .set_hyper(2, SlotHyper { lr: 0.1, ..hyper })
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "slot", .. }),
        "{err}"
    );
    let err = opt
        .step(&mut pool, &vec![0f32; 19], &vec![0f32; 24])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                operand: "grad_a",
                ..
            }
        ),
        "{err}"
    );
    let mut other = AdapterPool::<half::bf16>::new(&dev, PoolConfig { slots: 3, ..cfg }).unwrap();
    let err = opt
        .step(&mut other, &vec![0f32; 30], &vec![0f32; 36])
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "pool", .. }),
        "{err}"
    );
    let bad_betas = AdamWConfig {
        eps: f32::NAN,
        ..AdamWConfig::default()
    };
    assert!(SlotOptimizer::new(&pool, bad_betas).is_err());
}
