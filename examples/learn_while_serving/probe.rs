//! The interference check: one fixed sequence served through every slot
//! and once base-only, compared bit for bit with what it must be.
use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use lora_kernels::candle::CandleElement;

use crate::model::Model;
use crate::{BatchBuilder, Learner, Res};

/// The interference probe: one fixed sequence served through every slot
/// and once base-only, in a batch of the same shape every time, compared
/// bit for bit with what it must be.
#[derive(Default)]
pub struct Probe {
    /// The first probe's rows of the frozen user and of the base model.
    first: Option<(Vec<u32>, Vec<u32>)>,
    /// Learners that left, with their row as they left.
    pub left: Vec<(usize, Vec<u32>)>,
    /// Learners back since the last probe, and their new slots.
    pub rejoined: Vec<(usize, usize)>,
    checks: usize,
    empty_checks: usize,
    rejoin_checks: usize,
    /// Elements whose bits differ from what they must be.
    mismatches: usize,
}

impl Probe {
    const SEQ: usize = 8;

    /// The probe's logits' bits: a row per slot, then the base-only row.
    pub fn rows<T: CandleElement>(model: &Model<T>) -> Res<Vec<Vec<u32>>> {
        let tokens = Self::tokens(model.cfg.vocab);
        let mut probe = BatchBuilder::new(Self::SEQ);
        for slot in 0..model.cfg.slots {
            probe.push(&tokens, &tokens, slot as i32);
        }
        probe.push(&tokens, &tokens, -1);
        let logits = model
            .forward(&probe.batch)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bits: Vec<u32> = logits.into_iter().map(f32::to_bits).collect();
        Ok(bits
            .chunks(bits.len() / (model.cfg.slots + 1))
            .map(<[u32]>::to_vec)
            .collect())
    }

    /// Writes the probe's tokens and its rows for the served-only slot and
    /// the base model (f32 logits) to `path`, for scripts/llama-check.py.
    pub fn save<T: CandleElement>(model: &Model<T>, frozen: usize, path: &Path) -> Res<()> {
        let rows = Self::rows(model)?;
        let vocab = model.cfg.vocab;
        let logits = |row: &[u32]| {
            let v: Vec<f32> = row.iter().map(|&b| f32::from_bits(b)).collect();
            Tensor::from_vec(v, (Self::SEQ, vocab), &candle_core::Device::Cpu)
        };
        let tokens = Tensor::from_vec(Self::tokens(vocab), Self::SEQ, &candle_core::Device::Cpu)?;
        let tensors = HashMap::from([
            ("tokens".to_string(), tokens),
            ("served_only".to_string(), logits(&rows[frozen])?),
            ("base".to_string(), logits(&rows[model.cfg.slots])?),
        ]);
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    fn tokens(vocab: usize) -> Vec<u32> {
        (0..Self::SEQ as u32)
            .map(|t| (t * 7 + 3) % vocab as u32)
            .collect()
    }

    pub fn run<T: CandleElement>(
        &mut self,
        model: &Model<T>,
        learners: &[Learner],
        frozen: usize,
    ) -> Res<()> {
        let rows = Self::rows(model)?;
        let base = &rows[model.cfg.slots];
        let mut same = |a: &[u32], b: &[u32]| {
            self.checks += 1;
            self.mismatches += a.iter().zip(b).filter(|(x, y)| x != y).count();
        };
        if let Some((f, b)) = &self.first {
            same(f, &rows[frozen]);
            same(b, base);
        }
        // An empty slot serves the base model exactly.
        let occupied = |s: usize| s == frozen || learners.iter().any(|l| l.slot == Some(s));
        for slot in (0..model.cfg.slots).filter(|&s| !occupied(s)) {
            same(&rows[slot], base);
            self.empty_checks += 1;
        }
        // A learner back from a PEFT directory, in whatever slot: the bits
        // it had when it left.
        for (i, slot) in std::mem::take(&mut self.rejoined) {
            let (_, before) = self
                .left
                .iter()
                .find(|(j, _)| *j == i)
                .expect("left before");
            same(before, &rows[slot]);
            self.rejoin_checks += 1;
        }
        self.first
            .get_or_insert_with(|| (rows[frozen].clone(), base.clone()));
        Ok(())
    }

    pub fn report(&self) -> bool {
        println!(
            "\ninterference: {} probe rows compared bit for bit (the served-only user and the base \
             model against the first probe; {} empty slots against the base; {} rejoined learners \
             against their logits when they left): {} elements differ",
            self.checks, self.empty_checks, self.rejoin_checks, self.mismatches
        );
        self.mismatches == 0
    }
}
