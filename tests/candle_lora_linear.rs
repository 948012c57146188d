//! `LoraLinear` (feature `candle`) on candle's Cpu device (the host runtime):
//! its forward, training forward and backward give the bits of the candle
//! functions it wraps (themselves checked against the reference in
//! tests/candle.rs) on the pool it loaded, and bad adapters or weights are
//! refused, naming the operand and changing nothing.
mod common;

use candle_core::{DType, Device as CandleDevice, Tensor};
use common::{random, rng};
use half::bf16;
use lora_kernels::candle::LoraLinear;
use lora_kernels::candle::lora_backward::{BackwardRequest, multi_adapter_backward};
use lora_kernels::candle::multi_adapter_forward::{
    multi_adapter_forward, multi_adapter_forward_saving_t,
};

const CPU: CandleDevice = CandleDevice::Cpu;
/// (n, k): not a multiple of any tile.
const N: usize = 21;
const K: usize = 37;
/// Each slot's rank: rank 1 and mixed ranks.
const RANKS: [usize; 3] = [1, 7, 16];

fn uniform(seed: u64, shape: &[usize]) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(random::<bf16>(&mut rng(seed), len), shape, &CPU).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    t.to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// A layer over a random weight with every slot loaded (scale 0.5 + slot).
fn layer() -> (LoraLinear<bf16>, Vec<(Tensor, Tensor)>) {
    let mut layer = LoraLinear::<bf16>::new(uniform(1, &[N, K]), RANKS.len(), 16).unwrap();
    let mut adapters = Vec::new();
    for (slot, &rank) in RANKS.iter().enumerate() {
        let (a, b) = (
            uniform(10 + slot as u64, &[rank, K]),
            uniform(20 + slot as u64, &[N, rank]),
        );
        layer.load_adapter(slot, &a, &b, 0.5 + slot as f32).unwrap();
        adapters.push((a, b));
    }
    (layer, adapters)
}

/// Ids for `m` tokens: every slot, repeated, and base-only tokens.
fn ids(m: usize) -> Tensor {
    let ids: Vec<i32> = (0..m as i32).map(|i| i % 4 - 1).collect();
    Tensor::new(ids.as_slice(), &CPU).unwrap()
}

#[test]
fn load_adapter_puts_the_tensors_in_the_slot() {
    let (layer, adapters) = layer();
    for (slot, (a, b)) in adapters.iter().enumerate() {
        let got = layer
            .pool()
            .adapter(slot)
            .unwrap()
            .expect("the slot was loaded");
        assert_eq!(got.rank, RANKS[slot]);
        assert_eq!(got.scale, 0.5 + slot as f32);
        assert_eq!(got.a, a.flatten_all().unwrap().to_vec1::<bf16>().unwrap());
        assert_eq!(got.b, b.flatten_all().unwrap().to_vec1::<bf16>().unwrap());
    }
}

#[test]
fn forward_and_backward_are_the_pool_functions_on_the_layer() {
    let (layer, _) = layer();
    let (pool, w) = (layer.pool(), layer.weight());
    let (x, ids, g) = (uniform(2, &[9, K]), ids(9), uniform(3, &[9, N]));

    let y = layer.forward(&x, &ids).unwrap();
    assert_eq!(
        bits(&y),
        bits(&multi_adapter_forward(pool, &x, w, &ids).unwrap())
    );

    let (y_train, saved) = layer.forward_train(&x, &ids).unwrap();
    let (want_y, want_t) = multi_adapter_forward_saving_t(pool, &x, w, &ids).unwrap();
    assert_eq!(bits(&y_train), bits(&want_y));
    assert_eq!(bits(&y_train), bits(&y));

    // Twice each way: the layer reuses its scratch between calls, grown by
    // the deterministic mode's partials.
    for deterministic in [false, true, false, true] {
        let req = BackwardRequest {
            deterministic,
            ..Default::default()
        };
        let got = layer.backward(&saved, &g, req).unwrap();
        let want = multi_adapter_backward(pool, &g, &x, w, &want_t, &ids, req).unwrap();
        for (name, got, want) in [
            ("dx", &got.dx, &want.dx),
            ("da", &got.da, &want.da),
            ("db", &got.db, &want.db),
        ] {
            let (got, want) = (got.as_ref().unwrap(), want.as_ref().unwrap());
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(
                bits(got),
                bits(want),
                "{name} deterministic={deterministic}"
            );
        }
    }
    // Base-only tokens (id -1) and slots no token used: the adapters' terms
    // are there, so the layer's output differs from the base product.
    let base = x
        .to_dtype(DType::F32)
        .unwrap()
        .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
        .unwrap();
    assert_ne!(bits(&y), bits(&base.to_dtype(DType::BF16).unwrap()));
}

#[test]
fn an_evicted_slot_serves_the_base_only() {
    let (mut layer, _) = layer();
    let x = uniform(4, &[4, K]);
    let all_slot_2 = Tensor::new(&[2i32; 4], &CPU).unwrap();
    let base_only = Tensor::new(&[-1i32; 4], &CPU).unwrap();
    let before = layer.forward(&x, &all_slot_2).unwrap();
    assert_ne!(bits(&before), bits(&layer.forward(&x, &base_only).unwrap()));
    layer.evict(2).unwrap();
    assert_eq!(
        bits(&layer.forward(&x, &all_slot_2).unwrap()),
        bits(&layer.forward(&x, &base_only).unwrap())
    );
}

/// `result` is an error whose message names `operand`.
fn assert_names<R>(operand: &str, result: candle_core::Result<R>) {
    match result {
        Ok(_) => panic!("expected an error naming `{operand}`"),
        Err(e) => assert!(e.to_string().contains(operand), "`{operand}` not in: {e}"),
    }
}

#[test]
fn bad_adapters_are_refused_and_change_nothing() {
    let (mut layer, _) = layer();
    let before = layer.pool().adapter(1).unwrap();
    let (a, b) = (uniform(5, &[4, K]), uniform(6, &[N, 4]));
    assert_names(
        "a",
        layer.load_adapter(1, &uniform(5, &[4, K + 1]), &b, 1.0),
    );
    assert_names("b", layer.load_adapter(1, &a, &uniform(6, &[N, 5]), 1.0));
    assert_names(
        "b",
        layer.load_adapter(1, &a, &uniform(6, &[N + 1, 4]), 1.0),
    );
    assert_names(
        "a",
        layer.load_adapter(1, &a.to_dtype(DType::F32).unwrap(), &b, 1.0),
    );
    assert_names("a", layer.load_adapter(1, &uniform(5, &[K]), &b, 1.0));
    let (big_a, big_b) = (uniform(5, &[17, K]), uniform(6, &[N, 17]));
    assert_names("rank", layer.load_adapter(1, &big_a, &big_b, 1.0));
    // A NaN weight never enters the pool (docs/DESIGN.md section 10).
    let mut poisoned = a.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
    poisoned[3] = bf16::NAN;
    let poisoned = Tensor::from_vec(poisoned, (4, K), &CPU).unwrap();
    assert_names("a", layer.load_adapter(1, &poisoned, &b, 1.0));
    assert_names("slot", layer.load_adapter(3, &a, &b, 1.0));
    assert_eq!(layer.pool().adapter(1).unwrap(), before);
}

#[test]
fn bad_weights_are_refused() {
    assert_names(
        "weight",
        LoraLinear::<bf16>::new(uniform(1, &[2, N, K]), 2, 4),
    );
    let f32_weight = uniform(1, &[N, K]).to_dtype(DType::F32).unwrap();
    assert_names("weight", LoraLinear::<bf16>::new(f32_weight, 2, 4));
    assert_names(
        "max_rank",
        LoraLinear::<bf16>::new(uniform(1, &[N, K]), 2, 300),
    );
}
