//! Synthetic arithmetic text, the "reasoning track" of the pretraining corpus: problems with a
//! worked solution, deterministic for a seed.
//!
//! Each line is one document: `What is 47 + 385? 47 + 385 = 432.` with + − × over operands of
//! one to three digits (× keeps one operand ≤ two digits so the products stay readable).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }
    pub fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub a: i64,
    pub op: Op,
    pub b: i64,
}

impl Problem {
    pub fn answer(&self) -> i64 {
        self.op.apply(self.a, self.b)
    }
    pub fn question(&self) -> String {
        format!("What is {} {} {}?", self.a, self.op.symbol(), self.b)
    }
    /// The pretraining rendering: question, then the worked equation.
    pub fn text(&self) -> String {
        format!(
            "{} {} {} {} = {}.",
            self.question(),
            self.a,
            self.op.symbol(),
            self.b,
            self.answer()
        )
    }
}

fn operand(rng: &mut StdRng, max_digits: u32) -> i64 {
    let digits = rng.random_range(1..=max_digits);
    rng.random_range(0..10i64.pow(digits))
}

/// `n` problems for `seed`.
pub fn problems(n: usize, seed: u64) -> Vec<Problem> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xA517_0000_0000_0001);
    (0..n)
        .map(|_| {
            let op = match rng.random_range(0..3) {
                0 => Op::Add,
                1 => Op::Sub,
                _ => Op::Mul,
            };
            let (a, b) = match op {
                Op::Mul => (operand(&mut rng, 3), operand(&mut rng, 2)),
                _ => (operand(&mut rng, 3), operand(&mut rng, 3)),
            };
            Problem { a, op, b }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_correct() {
        let a = problems(200, 3);
        assert_eq!(a, problems(200, 3));
        assert_ne!(a, problems(200, 4));
        for p in &a {
            let t = p.text();
            let rhs: i64 = t
                .rsplit("= ")
                .next()
                .unwrap()
                .trim_end_matches('.')
                .parse()
                .unwrap();
            assert_eq!(rhs, p.answer());
        }
        assert!(a.iter().any(|p| p.op == Op::Mul) && a.iter().any(|p| p.answer() < 0));
    }
}
