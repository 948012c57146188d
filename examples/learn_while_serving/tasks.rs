//! What the users teach their adapters: each task is a private mapping of
//! tokens (a handful of source tokens, each with its own target), which the
//! frozen base knows nothing of and a low-rank adapter can learn. Sequences
//! are source tokens in random order; the target at each position is the
//! mapped token.
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

/// One task: `target[source]` for the task's source tokens.
#[derive(Clone)]
pub struct Task {
    sources: Vec<u32>,
    target: Vec<u32>,
}

impl Task {
    /// `sources` distinct random source tokens out of `vocab`, each mapped
    /// to a random target.
    pub fn random(rng: &mut StdRng, vocab: usize, sources: usize) -> Self {
        let mut all: Vec<u32> = (0..vocab as u32).collect();
        all.shuffle(rng);
        let target = (0..vocab)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        Task {
            sources: all[..sources].to_vec(),
            target,
        }
    }

    /// `seqs` sequences of `seq` source tokens: (tokens, targets).
    pub fn sample(&self, rng: &mut StdRng, seqs: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
        let tokens: Vec<u32> = (0..seqs * seq)
            .map(|_| self.sources[rng.random_range(0..self.sources.len())])
            .collect();
        let targets = tokens.iter().map(|&t| self.target[t as usize]).collect();
        (tokens, targets)
    }
}

/// A user's stream: its tasks in order, each from a step on, and the
/// randomness of its traffic (which sequences it sends, whether its
/// feedback arrives), drawn per step so that two learners of the same user
/// see exactly the same data.
pub struct Stream {
    pub name: &'static str,
    pub rank: usize,
    pub tasks: Vec<Task>,
    /// The step each task starts at (the first: when the user joins).
    pub starts: Vec<usize>,
    /// Fixed held-out sequences per task, to measure loss on.
    pub eval: Vec<(Vec<u32>, Vec<u32>)>,
    seed: u64,
}

impl Stream {
    pub fn new(
        name: &'static str,
        rank: usize,
        starts: Vec<usize>,
        vocab: usize,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let tasks: Vec<Task> = starts
            .iter()
            .map(|_| Task::random(&mut rng, vocab, SOURCES))
            .collect();
        let eval = tasks
            .iter()
            .map(|t| t.sample(&mut rng, EVAL_SEQS, EVAL_SEQ))
            .collect();
        Stream {
            name,
            rank,
            tasks,
            starts,
            eval,
            seed,
        }
    }

    /// The task the stream is on at `step`.
    pub fn task_at(&self, step: usize) -> usize {
        self.starts.iter().rposition(|&s| s <= step).unwrap_or(0)
    }

    /// The user's traffic at `step`: `seqs` sequences of `seq` tokens of its
    /// current task, and whether their feedback (the targets) arrives.
    pub fn traffic(
        &self,
        step: usize,
        seqs: usize,
        seq: usize,
        feedback: f64,
    ) -> (Vec<u32>, Vec<u32>, bool) {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (tokens, targets) = self.tasks[self.task_at(step)].sample(&mut rng, seqs, seq);
        (tokens, targets, rng.random_bool(feedback))
    }
}

/// Source tokens per task.
const SOURCES: usize = 8;
/// Held-out sequences per task, and their length.
pub const EVAL_SEQS: usize = 4;
pub const EVAL_SEQ: usize = 8;
