//! The fuzz targets without libFuzzer, for a machine where `cargo fuzz` cannot build: replays
//! every file of the given corpus directories, then mutates them at random (bit flips, byte
//! edits, splices, and tokens that matter to these parsers) until the time is up. Not coverage
//! guided, so weaker than libFuzzer, but the same targets and the same properties.
//!
//! `fallback <target> <seconds> <artifacts-dir> <corpus-dir>...`: exits 0 with a summary line,
//! or 1 after writing the first failing input to `<artifacts-dir>/crash-<hash>`.

use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Byte strings worth splicing in: path tricks, percent escapes, the endpoint, LDIF and JWT
/// syntax.
const TOKENS: &[&[u8]] = &[
    b"/",
    b"//",
    b"..",
    b".",
    b"%2e",
    b"%2E",
    b"%2f",
    b"%5c",
    b"%25",
    b"%00",
    b"?",
    b"#",
    b"@",
    b":",
    b":443",
    b"[::1]",
    b"\\",
    b"https://",
    b"localhost:9443",
    b"/B82617/STU3/1/gpconnect",
    b"/Slot",
    b"/Appointment/1",
    b"\n",
    b"\r\n",
    b"\n ",
    b"::",
    b":<",
    b"dn: ",
    b"version: 1",
    b"changetype: add",
    b"Bearer ",
    b".",
    b"{}",
    b"\"alg\":\"none\"",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 if !input.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            3 => input.insert(at, rng.next() as u8),
            4 | 5 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let to = (from + 1 + rng.below(64)).min(other.len());
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
        }
    }
    input.truncate(64 * 1024);
}

fn load(dirs: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut corpus = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            eprintln!("corpus {}: cannot read, skipped", dir.display());
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            match std::fs::read(&path) {
                Ok(bytes) => corpus.push(bytes),
                Err(e) => eprintln!("{}: {e}", path.display()),
            }
        }
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    corpus
}

fn save(artifacts: &Path, input: &[u8]) -> PathBuf {
    let hash = RandomState::new().hash_one(input);
    let path = artifacts.join(format!("crash-{hash:016x}"));
    if let Err(e) = std::fs::create_dir_all(artifacts).and_then(|()| std::fs::write(&path, input)) {
        eprintln!("cannot write {}: {e}", path.display());
    }
    path
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fallback <target> <seconds> <artifacts-dir> <corpus-dir>...";
    let (Some(name), Some(secs), Some(artifacts)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Some(&(_, target)) = ssp_gateway_fuzz::TARGETS.iter().find(|(n, _)| n == name) else {
        eprintln!("unknown target {name:?}; {usage}");
        return ExitCode::from(2);
    };
    let Ok(secs) = secs.parse::<u64>() else {
        eprintln!("seconds: {secs:?} is not a number; {usage}");
        return ExitCode::from(2);
    };
    let artifacts = PathBuf::from(artifacts);
    let dirs: Vec<PathBuf> = args[3..].iter().map(PathBuf::from).collect();
    let corpus = load(&dirs);
    // Silence the default panic message for each caught panic; report the first one ourselves.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));

    let run = |input: &[u8]| std::panic::catch_unwind(|| target(input)).is_ok();
    let started = Instant::now();
    for input in &corpus {
        if !run(input) {
            let path = save(&artifacts, input);
            eprintln!("{name}: a corpus input fails; saved as {}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let seed = RandomState::new().hash_one(started.elapsed().as_nanos()) | 1;
    let mut rng = Rng(seed);
    let deadline = started + Duration::from_secs(secs);
    let mut execs: u64 = corpus.len() as u64;
    let mut input = Vec::new();
    while Instant::now() < deadline {
        for _ in 0..256 {
            input.clear();
            input.extend_from_slice(&corpus[rng.below(corpus.len())]);
            mutate(&mut rng, &corpus, &mut input);
            execs += 1;
            if !run(&input) {
                let path = save(&artifacts, &input);
                eprintln!(
                    "{name}: failing input after {execs} runs; saved as {}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{name}: {execs} runs in {elapsed:.0} s ({:.0}/s), {} corpus inputs, no failure (fallback mode, seed {seed:#x})",
        execs as f64 / elapsed.max(1e-9),
        corpus.len()
    );
    ExitCode::SUCCESS
}
