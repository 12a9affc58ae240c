//! The short seeded fuzz run of `cargo test` (`make test`): every file-loader fuzz target
//! (`blip_peft::fuzzing`, the same bodies cargo-fuzz runs for millions of executions in `make fuzz`) over
//! its committed corpus (`fuzz/corpus/<target>/`) and a few thousand deterministic mutations of it (bit
//! flips, byte edits, truncations, splices, interesting numbers). A panic anywhere fails the test.

use std::path::Path;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [&[u8]; 12] = [
    b"0",
    b"-1",
    b"1e309",
    b"NaN",
    b"18446744073709551616",
    b"9223372036854775807",
    b"null",
    b"[]",
    b"{}",
    b"\"\"",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00\x00\x00\x00\x80",
];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                d.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i).min(64) + 1;
                d.drain(i..(i + n).min(len));
            }
            4 => d.truncate(rng.below(len + 1)),
            5 => {
                let i = rng.below(len + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                d.splice(i..(i + v.len()).min(len).max(i), v.iter().copied());
            }
            _ if !other.is_empty() => {
                let i = rng.below(len + 1);
                let j = rng.below(other.len());
                d.truncate(i);
                d.extend_from_slice(&other[j..]);
            }
            _ => {}
        }
    }
    d
}

#[test]
fn every_loader_survives_its_corpus_and_seeded_mutations() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("FUZZ_TMP", dir.path());
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus");
    let runs: usize = std::env::var("FUZZ_SEEDED_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    for (name, target) in blip_peft::fuzzing::TARGETS {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus.join(name))
            .unwrap_or_else(|e| panic!("the corpus of {name} is missing: {e}"))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for s in &seeds {
            target(s);
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        for _ in 0..runs {
            let seed = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, seed, other);
            target(&input);
        }
    }
}
