//! The host-side adapter-to-slot map: reuse, free slots first, LRU eviction,
//! never evicting what the current batch needs.
use lora_kernels::Error;
use lora_kernels::slot_map::SlotMap;

fn toks(keys: &[Option<&'static str>]) -> Vec<Option<&'static str>> {
    keys.to_vec()
}

#[test]
fn reuses_resident_adapters_and_fills_free_slots_first() {
    let mut map = SlotMap::new(3);
    let p = map
        .plan(&toks(&[Some("a"), None, Some("b"), Some("a")]))
        .unwrap();
    assert_eq!(p.loads, vec![("a", 0), ("b", 1)]);
    assert_eq!(p.slot_ids, vec![0, -1, 1, 0]);
    assert!(p.evicted.is_empty());
    let p = map.plan(&toks(&[Some("b"), Some("c")])).unwrap();
    assert_eq!((p.loads, p.slot_ids), (vec![("c", 2)], vec![1, 2]));
    assert_eq!(map.resident_count(), 3);
}

#[test]
fn evicts_the_least_recently_used_slot_not_needed_now() {
    let mut map = SlotMap::new(2);
    map.plan(&toks(&[Some("a")])).unwrap();
    map.plan(&toks(&[Some("b")])).unwrap();
    map.plan(&toks(&[Some("a")])).unwrap(); // b is now the least recently used
    let p = map.plan(&toks(&[Some("c"), Some("a")])).unwrap();
    assert_eq!(p.evicted, vec![("b", 1)]);
    assert_eq!(p.loads, vec![("c", 1)]);
    assert_eq!(p.slot_ids, vec![1, 0]);
    assert_eq!((map.slot_of(&"b"), map.slot_of(&"a")), (None, Some(0)));
    // Both resident ones are needed: the new one cannot fit.
    let err = map
        .plan(&toks(&[Some("a"), Some("c"), Some("d")]))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "tokens", .. }),
        "{err}"
    );
}

#[test]
fn an_empty_batch_plans_nothing() {
    let mut map: SlotMap<u32> = SlotMap::new(1);
    let p = map.plan(&[]).unwrap();
    assert!(p.slot_ids.is_empty() && p.loads.is_empty());
}
