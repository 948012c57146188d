//! What the demo prints at the end and plots: each learner's loss per
//! task, forgetting with and without the anchor pull, interference and
//! throughput; the checks that make the run fail.
use lora_kernels::candle::CandleElement;

use crate::{Demo, EVAL_EVERY, Event, Res, STEPS, plot};

impl<T: CandleElement> Demo<T> {
    pub fn report(&self) -> Res<bool> {
        println!(
            "\nheld-out loss per learner (task: at its start -> at its end; later: after other tasks)"
        );
        let mut ok = true;
        for l in &self.learners {
            let user = &self.users[l.user];
            let mut line = format!("  {:<11}", l.name(&self.users));
            for (task, curve) in l.curves.iter().enumerate() {
                let end = user.starts.get(task + 1).copied().unwrap_or(STEPS + 1);
                let during: Vec<f32> = curve.iter().filter(|p| p.0 < end).map(|p| p.1).collect();
                let (Some(&first), Some(&last)) = (during.first(), during.last()) else {
                    continue;
                };
                let learned = last < 0.5 * first;
                ok &= learned;
                line += &format!(
                    "  task {}: {first:.3} -> {last:.3}{}",
                    task + 1,
                    if learned { "" } else { " (NOT LEARNED)" }
                );
                if let Some(&(_, after)) = curve.last().filter(|p| p.0 >= end) {
                    line += &format!(", later {after:.3}");
                }
            }
            println!("{line}");
        }
        ok &= self.report_forgetting();
        ok &= self.probe.report();
        let (serve_ms, learn_ms) = (
            1e3 * self.serve_s / STEPS as f64,
            1e3 * self.learn_s / self.learn_steps as f64,
        );
        println!(
            "\nthe demo's steps ({}, {} build): serving {serve_ms:.1} ms per step ({:.0} tokens/s); \
             learning from the feedback (training forward, backward, optimizer) {learn_ms:.1} ms more",
            if self.model.on_gpu() {
                "GPU"
            } else {
                "host runtime, CPU"
            },
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            self.served_tokens as f64 / self.serve_s,
        );
        let png = self.out.join("losses.png");
        plot::losses(
            &png,
            &self.users,
            &self.learners_curves(),
            (STEPS, EVAL_EVERY),
            &self.event_steps(),
        )?;
        println!(
            "plot of every learner's loss per task over time: {}",
            png.display()
        );
        Ok(ok)
    }

    /// Forgetting: how much a user's task-1 loss rose while it learned task
    /// 2, for the plain and the anchored learner.
    fn report_forgetting(&self) -> bool {
        println!("\nforgetting (task-1 loss when task 2 starts -> at the end):");
        let mut ok = true;
        for (u, user) in self
            .users
            .iter()
            .enumerate()
            .filter(|(_, u)| u.tasks.len() > 1)
        {
            let switch = user.starts[1];
            let rise = |anchor: bool| {
                let l = (self.learners.iter())
                    .find(|l| l.user == u && l.anchor == anchor)
                    .expect("two learners per user");
                let curve = &l.curves[0];
                let before = curve
                    .iter()
                    .rfind(|p| p.0 <= switch)
                    .map_or(f32::NAN, |p| p.1);
                let end = curve.last().map_or(f32::NAN, |p| p.1);
                (before, end, end - before)
            };
            let (plain, anchored) = (rise(false), rise(true));
            let reduced = anchored.2 < plain.2;
            ok &= reduced;
            println!(
                "  {:<4} plain {:.3} -> {:.3} (+{:.3}); with anchor pull {:.3} -> {:.3} (+{:.3}){}",
                user.name,
                plain.0,
                plain.1,
                plain.2,
                anchored.0,
                anchored.1,
                anchored.2,
                if reduced { "" } else { "  NOT REDUCED" }
            );
        }
        ok
    }

    fn learners_curves(&self) -> Vec<plot::Learner<'_>> {
        (self.learners.iter())
            .map(|l| plot::Learner {
                user: l.user,
                anchor: l.anchor,
                curves: &l.curves,
            })
            .collect()
    }

    fn event_steps(&self) -> Vec<(usize, usize, bool)> {
        (self.events.iter())
            .map(|&(step, user, e)| (step, user, e == Event::NextTask))
            .collect()
    }
}
