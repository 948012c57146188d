//! What happens to users along the stream: they join with a fresh adapter,
//! leave (saved with their optimizer state, then evicted), come back into
//! whatever slot is free, and move on to new tasks.
use lora_kernels::candle::CandleElement;
use lora_kernels::ops::adamw::SlotHyper;
use lora_kernels::peft::LoadOptions;

use crate::probe::Probe;
use crate::{ANCHOR_PULL, DEMO, Demo, LR, Res, random_adapter};

/// What can happen to a user at a step.
#[derive(Clone, Copy, PartialEq)]
pub enum Event {
    /// Its learners get fresh adapters (PEFT's init: `b = 0`).
    Join,
    /// Its learners' adapters are saved (f32 masters and optimizer state)
    /// and evicted.
    Leave,
    /// Its learners' saved adapters are loaded into free slots.
    Rejoin,
    /// The stream moves to its next task (the anchored learner re-anchors).
    NextTask,
}

impl<T: CandleElement> Demo<T> {
    pub fn apply(&mut self, step: usize, user: usize, event: Event) -> Res<()> {
        // The anchored learner pulls toward its anchor once it has an
        // earlier task to keep (one back from a directory gets its anchor
        // back with the optimizer state).
        let pulls = |anchor: bool| anchor && self.users[user].task_at(step) > 0;
        let hyper = |pull: bool| SlotHyper {
            lr: LR,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            anchor_pull: if pull { ANCHOR_PULL } else { 0.0 },
        };
        let mine: Vec<usize> = (0..self.learners.len())
            .filter(|&i| self.learners[i].user == user)
            .collect();
        for i in mine {
            let anchor = self.learners[i].anchor;
            let lname = self.learners[i].name(&self.users);
            match event {
                Event::Join | Event::Rejoin => {
                    let slot = self.free_slot().ok_or("no free slot")?;
                    let model = &mut self.model;
                    let report = if event == Event::Join {
                        // PEFT's init: a random, b zero. Both learners of a
                        // user start from the same adapter.
                        let bound = 1.0 / (DEMO.hidden as f32).sqrt();
                        let rank = self.users[user].rank;
                        let adapter =
                            random_adapter(&DEMO, rank, 1000 + user as u64, (bound, 0.0))?;
                        (model.adapters).load_for_training(
                            slot,
                            &adapter,
                            LoadOptions::default(),
                            hyper(pulls(anchor)),
                            &mut model.optimizers,
                        )?
                    } else {
                        let dir = self.learners[i].saved.as_ref().ok_or("nothing saved")?;
                        (model.adapters).load_dir_for_training(
                            slot,
                            dir,
                            LoadOptions::default(),
                            hyper(pulls(anchor)),
                            &mut model.optimizers,
                        )?
                    };
                    self.learners[i].slot = Some(slot);
                    self.stepping[slot] = true; // a load for training activates the slot
                    if event == Event::Rejoin {
                        self.probe.rejoined.push((i, slot));
                    }
                    println!(
                        "step {step:3}: {lname} joins in slot {slot}{}",
                        if report.optimizer_state {
                            " (weights and optimizer state from its directory)"
                        } else {
                            ""
                        }
                    );
                }
                Event::Leave => {
                    let slot = self.learners[i].slot.take().ok_or("not in a slot")?;
                    let rows = Probe::rows(&self.model)?;
                    self.probe.left.push((i, rows[slot].clone()));
                    let model = &mut self.model;
                    let dir = self.out.join(format!("adapters/{lname}"));
                    model
                        .adapters
                        .save_for_training(slot, &dir, &model.optimizers)?;
                    model.adapters.evict(slot)?;
                    self.learners[i].saved = Some(dir.clone());
                    println!(
                        "step {step:3}: {lname} leaves slot {slot}, saved to {}",
                        dir.display()
                    );
                }
                Event::NextTask => {
                    let slot = self.learners[i].slot.ok_or("not in a slot")?;
                    if anchor {
                        for opt in self.model.optimizers.values_mut() {
                            opt.set_anchor(slot)?;
                            opt.set_hyper(slot, hyper(true))?;
                        }
                    }
                    println!(
                        "step {step:3}: {lname} starts task {}{}",
                        self.users[user].task_at(step) + 1,
                        if anchor {
                            " (anchor: the adapter as it is now)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Ok(())
    }

    fn free_slot(&self) -> Option<usize> {
        (0..DEMO.slots)
            .find(|&s| s != self.frozen_slot && self.learners.iter().all(|l| l.slot != Some(s)))
    }
}
