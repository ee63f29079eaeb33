//! Pick tables, built once per change of the instance set and read lock-free by every pick.
//!
//! - [`Alias`]: Vose's alias method (Vose, *A linear algorithm for generating random numbers with
//!   a given distribution*, IEEE TSE 1991): a weighted draw in O(1), for `random` and for the
//!   weighted candidate draws of the P2C strategies.
//! - [`Ring`]: ketama consistent hashing (Karger et al. 1997; the libketama layout of 160 points
//!   per weight unit). Removing one of N instances moves only its ~1/N of the keys.
//! - [`Maglev`]: the lookup table of Eisenbud et al., *Maglev: A Fast and Reliable Software
//!   Network Load Balancer* (NSDI 2016), §3.4: each backend fills the prime-sized table along its
//!   own permutation `(offset + j × skip) mod M`, in turns, so shares are even to within M/N and
//!   a lookup is one modulo and one load. Weights follow Envoy's extension: a backend takes a turn
//!   in round `r` only while `r × weight ≥ turns taken × max weight`.

use std::{cmp::Reverse, collections::BinaryHeap};

use crate::hash::{hash_bytes, Rng};

/// Vose alias table over the member weights.
#[derive(Debug, Default)]
pub(crate) struct Alias {
    /// Acceptance threshold of each column, scaled to `u32`.
    prob: Vec<u32>,
    alias: Vec<u32>,
}

impl Alias {
    pub(crate) fn new(weights: &[f64]) -> Self {
        let n = weights.len();
        if n == 0 {
            return Self::default();
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Self {
                prob: vec![u32::MAX; n],
                alias: (0..n as u32).collect(),
            };
        }
        let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut prob = vec![u32::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            prob[s] = (scaled[s] * u32::MAX as f64) as u32;
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        Self { prob, alias }
    }

    /// A weighted draw: an index into the weights.
    #[inline]
    pub(crate) fn sample(&self, rng: &Rng) -> usize {
        let n = self.prob.len();
        let r = rng.next_u64();
        let col = (((r >> 32) * n as u64) >> 32) as usize;
        if (r as u32) <= self.prob[col] {
            col
        } else {
            self.alias[col] as usize
        }
    }
}

/// A ketama hash ring: sorted points, each naming a member.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u32)>,
    members: usize,
}

impl Ring {
    /// The most points a ring holds; weights are scaled down to fit.
    pub const MAX_POINTS: usize = 1 << 21;

    /// Builds the ring over `(name, weight)` members, `points_per_weight` points per unit of weight
    /// relative to the lightest member.
    pub fn build<'a>(
        members: impl IntoIterator<Item = (&'a str, u32)>,
        points_per_weight: u32,
    ) -> Self {
        let members: Vec<(&str, u32)> = members.into_iter().collect();
        let min_w = members.iter().map(|m| m.1.max(1)).min().unwrap_or(1) as f64;
        let wanted: f64 = members
            .iter()
            .map(|m| f64::from(points_per_weight) * f64::from(m.1.max(1)) / min_w)
            .sum();
        let scale = if wanted > Self::MAX_POINTS as f64 {
            Self::MAX_POINTS as f64 / wanted
        } else {
            1.0
        };
        let mut points = Vec::with_capacity(wanted.min(Self::MAX_POINTS as f64) as usize);
        for (idx, (name, w)) in members.iter().enumerate() {
            let n = (f64::from(points_per_weight) * f64::from((*w).max(1)) / min_w * scale)
                .round()
                .max(1.0) as u64;
            let base = hash_bytes(name.as_bytes(), 0x6b65_7461_6d61);
            for p in 0..n {
                points.push((
                    crate::hash::fmix64(base ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    idx as u32,
                ));
            }
        }
        points.sort_unstable();
        Self {
            points,
            members: members.len(),
        }
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The member owning `hash`.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        self.successors(hash).next()
    }

    /// Members clockwise from `hash`, each distinct member once, for skipping unusable ones.
    pub fn successors(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|p| p.0 < hash);
        let len = self.points.len();
        let mut seen = 0usize;
        let mut last = u32::MAX;
        (0..len)
            .map(move |k| self.points[(start + k) % len].1)
            .filter(move |&m| {
                // Skip runs of the same member; a member may reappear later (rare and harmless).
                let new = m != last;
                last = m;
                new
            })
            .take_while(move |_| {
                seen += 1;
                seen <= self.members.max(1) * 4
            })
            .map(|m| m as usize)
    }
}

/// A Maglev lookup table of prime size `M`.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<u32>,
}

/// One member's place in a Maglev build: its permutation of the slots, and its turns.
struct Turn {
    /// `(offset + next × skip) mod M`, the next slot of its permutation, kept incrementally so
    /// the build does no division.
    pos: u64,
    skip: u64,
    weight: u64,
    /// Its turns so far × the largest weight.
    target: u64,
}

impl Turn {
    /// The members' turns in the order given, and the largest weight (each weight at least 1).
    fn members<'a>(members: impl IntoIterator<Item = (&'a str, u32)>, m: u64) -> (Vec<Self>, u64) {
        let turns: Vec<Self> = members
            .into_iter()
            .map(|(name, w)| {
                let h1 = hash_bytes(name.as_bytes(), 0x6d61_676c_6576);
                let h2 = hash_bytes(name.as_bytes(), 0x736b_6970);
                Self {
                    pos: h1 % m,
                    skip: if m > 1 { h2 % (m - 1) + 1 } else { 1 },
                    weight: u64::from(w.max(1)),
                    target: 0,
                }
            })
            .collect();
        let max_w = turns.iter().map(|t| t.weight).max().unwrap_or(1);
        (turns, max_w)
    }

    /// Takes a turn: the next free slot of its permutation, marked in `taken` (occupancy as a
    /// bitset, 8 KiB for M = 65537, within L1: most of the build is probing for a free slot,
    /// and this keeps the probes out of the 256 KiB table). A slot must be free.
    fn take(&mut self, taken: &mut [u64], m: u64, max_w: u64) -> u64 {
        self.target += max_w;
        let (mut c, skip) = (self.pos, self.skip);
        while taken[(c >> 6) as usize] & (1 << (c & 63)) != 0 {
            c += skip;
            if c >= m {
                c -= m;
            }
        }
        taken[(c >> 6) as usize] |= 1 << (c & 63);
        self.pos = if c + skip >= m {
            c + skip - m
        } else {
            c + skip
        };
        c
    }
}

impl Maglev {
    /// Builds the table over `(name, weight)` members. `m` should be a prime well above 100 × the
    /// number of members (65537 by default). Members are indexed in the order given.
    pub fn build<'a>(members: impl IntoIterator<Item = (&'a str, u32)>, m: u32) -> Self {
        let m = u64::from(m.max(1));
        let (mut b, max_w) = Turn::members(members, m);
        if b.is_empty() {
            return Self { table: Vec::new() };
        }
        let mut table = vec![u32::MAX; m as usize];
        let mut taken = vec![0u64; (m as usize).div_ceil(64)];
        let mut filled = 0u64;
        // Turns are taken in rounds 1, 2, …, and within a round in member order. Member `i` may
        // take one turn in round `r` once `r × weight ≥ target` (its turns so far × max weight),
        // so after a turn in round `r` its next turn is in round
        // `max(r + 1, ⌈target / weight⌉)`. Rather than visit every member every round (M × N
        // steps when one weight dwarfs the others), each member is scheduled for its next round:
        // `cur` holds, in member order, those due in the current round and `next` those due in
        // the one after (the common case, without division); the rest wait in `later`, a
        // min-heap keyed by `round << 32 | member`, so the table comes out the same as visiting
        // every member every round. A member of the largest weight takes a turn every round,
        // so the table is full by round M and later rounds need never be scheduled.
        let mut cur: Vec<u32> = (0..b.len() as u32).collect();
        let mut next: Vec<u32> = Vec::with_capacity(cur.len());
        let mut due: Vec<u32> = Vec::new();
        let mut merged: Vec<u32> = Vec::new();
        let mut later: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
        let mut round = 1u64;
        'rounds: while filled < m {
            due.clear();
            while let Some(&Reverse(key)) = later.peek() {
                if key >> 32 != round {
                    break;
                }
                later.pop();
                due.push(key as u32);
            }
            if !due.is_empty() {
                // `cur` and `due` are each in member order (and disjoint): merge them.
                merged.clear();
                let (mut a, mut d) = (0, 0);
                while let (Some(&x), Some(&y)) = (cur.get(a), due.get(d)) {
                    if x < y {
                        merged.push(x);
                        a += 1;
                    } else {
                        merged.push(y);
                        d += 1;
                    }
                }
                merged.extend_from_slice(&cur[a..]);
                merged.extend_from_slice(&due[d..]);
                std::mem::swap(&mut cur, &mut merged);
            }
            for &i in &cur {
                let e = &mut b[i as usize];
                table[e.take(&mut taken, m, max_w) as usize] = i;
                filled += 1;
                if filled >= m {
                    break 'rounds;
                }
                if (round + 1) * e.weight >= e.target {
                    next.push(i);
                } else {
                    let r = e.target.div_ceil(e.weight);
                    if r <= m {
                        later.push(Reverse(r << 32 | u64::from(i)));
                    }
                }
            }
            std::mem::swap(&mut cur, &mut next);
            next.clear();
            round += 1;
            if cur.is_empty() {
                // Not reached while a member of the largest weight is scheduled every round.
                match later.peek() {
                    Some(&Reverse(key)) => round = key >> 32,
                    None => break,
                }
            }
        }
        Self { table }
    }

    /// The table size.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty (no members).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The member owning `hash`: one modulo, one load.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }

    /// How many table entries each of `n` members owns.
    pub fn shares(&self, n: usize) -> Vec<usize> {
        let mut s = vec![0; n];
        for &e in &self.table {
            if let Some(x) = s.get_mut(e as usize) {
                *x += 1;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{
        any, prop, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig, Strategy,
    };

    use super::*;

    /// The build's rounds as they were before members were scheduled by round: every member
    /// visited every round. Slow (M × N under skewed weights) but plainly the definition; the
    /// build must match it.
    fn reference(members: &[(&str, u32)], m: u32) -> Vec<u32> {
        let m = u64::from(m.max(1));
        let (mut b, max_w) = Turn::members(members.iter().copied(), m);
        if b.is_empty() {
            return Vec::new();
        }
        let mut table = vec![u32::MAX; m as usize];
        let mut taken = vec![0u64; (m as usize).div_ceil(64)];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < m {
            for (i, e) in b.iter_mut().enumerate() {
                if filled >= m {
                    break;
                }
                if round * e.weight < e.target {
                    continue;
                }
                table[e.take(&mut taken, m, max_w) as usize] = i as u32;
                filled += 1;
            }
            round += 1;
        }
        table
    }

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:8080", i / 256, i % 256))
            .collect()
    }

    #[test]
    fn alias_is_weighted() {
        let a = Alias::new(&[5.0, 1.0, 1.0, 3.0]);
        let rng = Rng::new(3);
        let mut c = [0u32; 4];
        for _ in 0..100_000 {
            c[a.sample(&rng)] += 1;
        }
        for (i, w) in [0.5, 0.1, 0.1, 0.3].iter().enumerate() {
            assert!((f64::from(c[i]) / 100_000.0 - w).abs() < 0.01, "{c:?}");
        }
    }

    #[test]
    fn maglev_weighted_shares() {
        let names: Vec<String> = (0..4).map(|i| format!("i{i}")).collect();
        let t = Maglev::build(names.iter().map(|n| n.as_str()).zip([1, 2, 3, 4]), 65_537);
        let s = t.shares(4);
        for (i, w) in [0.1, 0.2, 0.3, 0.4].iter().enumerate() {
            assert!((s[i] as f64 / 65_537.0 - w).abs() < 0.01, "{s:?}");
        }
    }

    #[test]
    fn maglev_matches_reference_when_one_weight_dwarfs_the_rest() {
        let names = names(2_000);
        let members: Vec<(&str, u32)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), if i == 0 { 1_000_000 } else { 1 }))
            .collect();
        let t = Maglev::build(members.iter().copied(), 65_537);
        assert_eq!(t.table, reference(&members, 65_537));
        // Every member still gets its first turn in round 1.
        assert!(t.shares(2_000).iter().all(|&s| s >= 1));
    }

    #[test]
    fn maglev_matches_reference_at_the_edges() {
        let names = names(20);
        for m in [1, 2, 7, 13, 101] {
            for n in [0, 1, 2, 13, 20] {
                let members: Vec<(&str, u32)> = names[..n]
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.as_str(), (i as u32 % 3) * 7))
                    .collect();
                let t = Maglev::build(members.iter().copied(), m);
                assert_eq!(t.table, reference(&members, m), "m={m} n={n}");
            }
        }
    }

    /// Member weights: mostly 1..=1000 (small ones often dividing the largest, which lands turns
    /// exactly on a round boundary), and in two cases of three up to two heavy members, mostly
    /// at or near the 1_000_000 cap.
    fn weights() -> impl Strategy<Value = Vec<u32>> {
        let light = prop_oneof![
            3 => 1u32..=1000,
            1 => prop::sample::select(vec![1u32, 2, 3, 4, 5, 8, 10, 100, 1000]),
        ];
        let heavy = prop_oneof![
            2 => Just(1_000_000u32),
            1 => 999_000u32..=1_000_000,
            1 => 1_001u32..=20_000,
        ];
        (
            proptest::collection::vec(light, 0..40),
            proptest::collection::vec((any::<prop::sample::Index>(), heavy), 0..3),
        )
            .prop_map(|(mut w, heavy)| {
                for (at, h) in heavy {
                    if !w.is_empty() {
                        let i = at.index(w.len());
                        w[i] = h;
                    }
                }
                w
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn maglev_build_matches_reference(
            weights in weights(),
            m in prop::sample::select(vec![13u32, 101, 65_537]),
            salt in any::<u16>(),
        ) {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("m{salt}-{i}")).collect();
            let members: Vec<(&str, u32)> =
                names.iter().map(String::as_str).zip(weights.iter().copied()).collect();
            let t = Maglev::build(members.iter().copied(), m);
            prop_assert_eq!(t.table, reference(&members, m));
        }
    }
}
