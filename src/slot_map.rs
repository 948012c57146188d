//! Host-side bookkeeping for serving more adapters than a pool has slots:
//! which adapter (by the caller's key: a user id, an adapter name) sits in
//! which slot, and which slot to evict (least recently used) when a batch
//! needs an adapter that is not resident.
use std::collections::HashMap;
use std::hash::Hash;

use crate::error::{Error, Result};

/// The plan for one batch: the slot id of every token, and the adapters to
/// load (into which slot) before launching it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan<K> {
    /// The slot of each token (`-1` for a token without an adapter), ready
    /// to upload as the multi-adapter forward's per-token ids.
    pub slot_ids: Vec<i32>,
    /// (adapter, slot): load these, in order, before the batch.
    pub loads: Vec<(K, usize)>,
    /// Adapters evicted to make room, with the slot each had.
    pub evicted: Vec<(K, usize)>,
}

/// Which adapter sits in which slot of a pool, by the caller's key, with
/// least-recently-used eviction (host-side bookkeeping only: the caller
/// loads what [`SlotMap::plan`] says into the [`crate::AdapterPool`]).
///
/// ```
/// use lora_kernels::SlotMap;
///
/// let mut map = SlotMap::new(2);
/// let plan = map.plan(&[Some("alice"), None, Some("bob"), Some("alice")])?;
/// assert_eq!(plan.slot_ids, vec![0, -1, 1, 0]);
/// assert_eq!(plan.loads, vec![("alice", 0), ("bob", 1)]);
/// // carol needs a slot: bob was used least recently, so carol takes his.
/// let plan = map.plan(&[Some("alice"), Some("carol")])?;
/// assert_eq!(plan.evicted, vec![("bob", 1)]);
/// assert_eq!(plan.slot_ids, vec![0, 1]);
/// # Ok::<(), lora_kernels::Error>(())
/// ```
#[derive(Debug)]
pub struct SlotMap<K> {
    resident: HashMap<K, usize>,
    owner: Vec<Option<K>>,
    last_used: Vec<u64>,
    tick: u64,
}

impl<K: Eq + Hash + Clone> SlotMap<K> {
    /// A map over `slots` slots, all free.
    pub fn new(slots: usize) -> Self {
        SlotMap {
            resident: HashMap::new(),
            owner: vec![None; slots],
            last_used: vec![0; slots],
            tick: 0,
        }
    }

    /// The slot holding `key`, if resident (does not count as a use).
    pub fn slot_of(&self, key: &K) -> Option<usize> {
        self.resident.get(key).copied()
    }

    /// How many keys hold a slot.
    pub fn resident_count(&self) -> usize {
        self.resident.len()
    }

    /// Plans a batch whose token `i` wants adapter `tokens[i]` (None = base
    /// model only). Resident adapters are reused; missing ones go to free
    /// slots, then to the least recently used slots that this batch does not
    /// need. More distinct adapters than slots in one batch is an error.
    pub fn plan(&mut self, tokens: &[Option<K>]) -> Result<BatchPlan<K>> {
        self.tick += 1;
        let now = self.tick;
        let mut wanted: Vec<&K> = Vec::new();
        for key in tokens.iter().flatten() {
            if !wanted.contains(&key) {
                wanted.push(key);
            }
        }
        if wanted.len() > self.owner.len() {
            return Err(Error::InvalidArgument {
                name: "tokens",
                value: format!("{} distinct adapters", wanted.len()),
                reason: format!(
                    "one batch can use at most the pool's {} slots",
                    self.owner.len()
                ),
            });
        }
        // Mark what is already resident as used now, so it is not evicted below.
        for key in &wanted {
            if let Some(&slot) = self.resident.get(*key) {
                self.last_used[slot] = now;
            }
        }
        let mut plan = BatchPlan {
            slot_ids: Vec::with_capacity(tokens.len()),
            loads: Vec::new(),
            evicted: Vec::new(),
        };
        for key in wanted {
            if self.resident.contains_key(key) {
                continue;
            }
            // A free slot first, else the least recently used one not used now.
            let slot = (0..self.owner.len())
                .filter(|&s| self.last_used[s] < now)
                .min_by_key(|&s| (self.owner[s].is_some(), self.last_used[s]))
                .expect("fewer distinct adapters than slots leaves a slot unused by this batch");
            if let Some(old) = self.owner[slot].take() {
                self.resident.remove(&old);
                plan.evicted.push((old, slot));
            }
            self.owner[slot] = Some(key.clone());
            self.resident.insert(key.clone(), slot);
            self.last_used[slot] = now;
            plan.loads.push((key.clone(), slot));
        }
        plan.slot_ids = tokens
            .iter()
            .map(|t| t.as_ref().map_or(-1, |key| self.resident[key] as i32))
            .collect();
        Ok(plan)
    }
}
