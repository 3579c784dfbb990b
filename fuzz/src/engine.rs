//! The fuzz loop, on stable Rust: a corpus seeded with real encodings, byte mutations (bit
//! flips, interesting numbers written over length fields, inserted dictionary tokens, splices
//! of two inputs), fresh random inputs now and then (which the structure-aware targets decode
//! with `arbitrary`), and a cheap substitute for coverage: each target names the *behaviour* an
//! input produced (which error, which state), and an input with a behaviour not seen before
//! joins the corpus. Every input runs under `catch_unwind` and the counting allocator; a panic,
//! or a peak allocation above the limit the target computed for that input, is a failure.
//!
//! Runs are deterministic for a seed (one thread per run), so a failure found in CI reproduces
//! with the same `--seed`. The long-running command also writes each input to
//! `<artifacts>/<target>.current` before running it, so a crash that no handler survives
//! (an abort, a kill for memory) leaves the culprit behind.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use crate::meter;

/// What one input did.
pub struct Run {
    /// A label of the behaviour (an error's kind, a state reached): new labels grow the corpus.
    pub behaviour: u64,
    /// Bytes the code under test may have live at once for this input.
    pub limit: u64,
    /// How far into the code the input got (0: refused at once .. 3: all the way), for the
    /// report: a fuzzer whose inputs all stop at the first check tests little.
    pub depth: usize,
}

/// Something to fuzz.
pub trait Target {
    fn name(&self) -> &'static str;
    /// Valid inputs to start from, built with the project's own encoders.
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Tokens worth inserting whole (keywords, delimiters, numbers at type limits).
    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[]
    }
    /// Runs one input. Implementations call [`meter::reset`] right before the code under test,
    /// so that building the input is not counted against it.
    fn run(&mut self, data: &[u8]) -> Run;
}

/// How to fuzz.
#[derive(Debug, Clone)]
pub struct Options {
    pub inputs: u64,
    pub seed: u64,
    /// Where failing inputs (and the current one) are written; none in tests.
    pub artifacts: Option<PathBuf>,
    /// Stop after this many failures.
    pub max_failures: usize,
    /// An input running longer than this is a failure (reported, then the process aborts:
    /// a hung input cannot be interrupted).
    pub timeout: Duration,
    /// Longest input the mutator makes.
    pub max_len: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            inputs: 100_000,
            seed: 1,
            artifacts: None,
            max_failures: 5,
            timeout: Duration::from_secs(20),
            max_len: 64 * 1024,
        }
    }
}

/// Why an input failed.
#[derive(Debug, Clone)]
pub enum Failure {
    Panic {
        message: String,
        input: Vec<u8>,
    },
    Memory {
        peak: u64,
        limit: u64,
        input: Vec<u8>,
    },
}

impl Failure {
    pub fn input(&self) -> &[u8] {
        match self {
            Failure::Panic { input, .. } | Failure::Memory { input, .. } => input,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Panic { message, input } => {
                write!(f, "panic on a {}-byte input: {message}", input.len())
            }
            Failure::Memory { peak, limit, input } => write!(
                f,
                "a {}-byte input made the code hold {peak} bytes at once (limit {limit})",
                input.len()
            ),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub inputs: u64,
    pub corpus: usize,
    pub behaviours: usize,
    /// The largest peak allocation of any input, and its share of that input's limit.
    pub max_peak: u64,
    pub max_share: f64,
    pub elapsed: Duration,
    pub failures: Vec<Failure>,
    /// Inputs that got to each depth (see [`Run::depth`]).
    pub depths: [u64; 4],
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

thread_local! {
    static IN_FUZZ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics inside the fuzz loop are recorded quietly; any other panic (a test's own assert)
/// still reaches the default hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_FUZZ.with(|f| f.get()) {
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
            } else {
                default(info)
            }
        }));
    });
}

/// splitmix64: small, fast and good enough to drive mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.next_u64().is_multiple_of(one_in.max(1))
    }
}

/// Numbers that sit at the edges of the types length fields use.
const INTERESTING: [u64; 22] = [
    0,
    1,
    2,
    7,
    8,
    16,
    32,
    64,
    127,
    128,
    255,
    256,
    1024,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// Mutates `data` in place with one to eight stacked mutations.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], max_len: usize) {
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(13) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 | 3 if len > 0 => {
                // An interesting number over a 1, 2, 4 or 8-byte field, either endianness.
                let width = [1, 2, 4, 8][rng.below(4)];
                let mut v = INTERESTING[rng.below(INTERESTING.len())];
                if rng.chance(4) {
                    v = v.wrapping_sub(1 + rng.below(4) as u64);
                }
                let bytes = if rng.chance(8) {
                    v.to_be_bytes()[8 - width..].to_vec()
                } else {
                    v.to_le_bytes()[..width].to_vec()
                };
                let at = rng.below(len);
                for (k, b) in bytes.into_iter().enumerate() {
                    if let Some(d) = data.get_mut(at + k) {
                        *d = b;
                    }
                }
            }
            4 if len >= 4 => {
                // Small arithmetic on a little-endian u32: lengths off by a few.
                let at = rng.below(len - 3);
                let v = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
                let d = 1 + rng.below(16) as u32;
                let v = if rng.chance(2) {
                    v.wrapping_add(d)
                } else {
                    v.wrapping_sub(d)
                };
                data[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let n = 1 + rng.below((len - start).min(64));
                data.drain(start..start + n);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(at..at, bytes);
            }
            7 if len > 0 => {
                // Duplicate a range (repeated records, doubled chunks).
                let start = rng.below(len);
                let n = 1 + rng.below((len - start).min(256));
                let piece = data[start..start + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, piece);
            }
            8 if len > 0 => data.truncate(rng.below(len)),
            9 | 10 if !dict.is_empty() => {
                let word = dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                if rng.chance(2) || at + word.len() > len {
                    data.splice(at..at, word.iter().copied());
                } else {
                    data[at..at + word.len()].copy_from_slice(word);
                }
            }
            11 if !other.is_empty() => {
                // Splice: our head, the other input's tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            12 if len > 0 => {
                // Copy a range over another place in the same input.
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(64));
                let to = rng.below(len);
                let piece = data[from..from + n].to_vec();
                for (k, b) in piece.into_iter().enumerate() {
                    if let Some(d) = data.get_mut(to + k) {
                        *d = b;
                    }
                }
            }
            _ => {
                let b = rng.next_u64() as u8;
                data.push(b);
            }
        }
    }
    data.truncate(max_len);
}

/// A stable label for a behaviour described by `text`: words with digits in them (numbers,
/// hex dumps) and quoted parts (names, values: between backticks or double quotes) are left
/// out, so that one kind of error with different numbers or names counts once.
pub fn label(text: &str) -> u64 {
    let mut unquoted = String::with_capacity(text.len());
    let mut quoted: Option<char> = None;
    for c in text.chars() {
        match quoted {
            Some(q) if c == q => quoted = None,
            Some(_) => {}
            None if c == '`' || c == '"' => quoted = Some(c),
            None => unquoted.push(c),
        }
    }
    // FNV-1a over the words that remain.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for word in unquoted.split_whitespace() {
        if word.bytes().any(|b| b.is_ascii_digit()) {
            continue;
        }
        for b in word.bytes().chain([b' ']) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Most inputs kept in the corpus.
const MAX_CORPUS: usize = 4096;

/// Fuzzes `target` for `opts.inputs` inputs.
pub fn fuzz(target: &mut dyn Target, opts: &Options) -> Report {
    install_panic_hook();
    let name = target.name();
    let mut rng = Rng::new(opts.seed);
    let seeds = target.seeds();
    // Inputs with the depth they reached: parents are drawn favouring deep ones, so that the
    // many shallow inputs a new error message brings in do not crowd out the valid ones.
    let mut corpus: Vec<(Vec<u8>, usize)> = seeds.iter().map(|s| (s.clone(), 3)).collect();
    if corpus.is_empty() {
        corpus.push((Vec::new(), 0));
    }
    let pick = |rng: &mut Rng, corpus: &[(Vec<u8>, usize)]| {
        let mut best = rng.below(corpus.len());
        for _ in 0..2 {
            let other = rng.below(corpus.len());
            if corpus[other].1 > corpus[best].1 {
                best = other;
            }
        }
        best
    };
    let dict = target.dictionary();
    let mut seen = HashSet::new();
    let mut failures = Vec::new();
    let (mut max_peak, mut max_share) = (0u64, 0f64);
    let mut depths = [0u64; 4];
    let current = opts.artifacts.as_ref().and_then(|dir| {
        std::fs::create_dir_all(dir).ok()?;
        File::create(dir.join(format!("{name}.current"))).ok()
    });
    // The watchdog: an input that runs past the timeout cannot be stopped, only reported.
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (progress, done, timeout) = (progress.clone(), done.clone(), opts.timeout);
        std::thread::spawn(move || {
            let mut last = (0, Instant::now());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let now = progress.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > timeout {
                    eprintln!(
                        "mdi-fuzz {name}: input {now} has run for over {timeout:?}; the input is \
                         in the artifacts' {name}.current (rerun with the same --seed)"
                    );
                    std::process::abort();
                }
            }
        })
    };
    let start = Instant::now();
    let mut input = Vec::new();
    let mut ran = 0;
    for i in 0..opts.inputs {
        input.clear();
        if i < seeds.len() as u64 {
            // Every seed once as it is.
            input.extend_from_slice(&seeds[i as usize]);
        } else if rng.chance(16) {
            // Fresh bytes: structure-aware targets decode them into whole message sequences.
            let n = rng.below(512);
            input.extend((0..n).map(|_| rng.next_u64() as u8));
        } else {
            let parent = if rng.chance(8) && !seeds.is_empty() {
                &seeds[rng.below(seeds.len())]
            } else {
                &corpus[pick(&mut rng, &corpus)].0
            };
            input.extend_from_slice(parent);
            let other = &corpus[rng.below(corpus.len())].0;
            mutate(&mut rng, &mut input, other, dict, opts.max_len);
        }
        if let Some(f) = &current {
            let mut framed = (input.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(&input);
            let _ = f.write_all_at(&framed, 0);
        }
        progress.store(i + 1, Ordering::Relaxed);
        IN_FUZZ.with(|f| f.set(true));
        meter::reset();
        let outcome = catch_unwind(AssertUnwindSafe(|| target.run(&input)));
        let peak = meter::peak();
        IN_FUZZ.with(|f| f.set(false));
        ran = i + 1;
        let failure = match outcome {
            Err(_) => Some(Failure::Panic {
                message: LAST_PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "a panic".into()),
                input: input.clone(),
            }),
            Ok(run) => {
                depths[run.depth.min(3)] += 1;
                max_peak = max_peak.max(peak);
                max_share = max_share.max(peak as f64 / run.limit.max(1) as f64);
                if seen.insert(run.behaviour) {
                    let entry = (input.clone(), run.depth);
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(entry);
                    } else {
                        // Replace a shallower (or equal) entry, if a few draws find one.
                        let k = (0..4)
                            .map(|_| rng.below(corpus.len()))
                            .min_by_key(|&k| corpus[k].1)
                            .unwrap_or(0);
                        if corpus[k].1 <= run.depth {
                            corpus[k] = entry;
                        }
                    }
                }
                (peak > run.limit).then(|| Failure::Memory {
                    peak,
                    limit: run.limit,
                    input: input.clone(),
                })
            }
        };
        if let Some(f) = failure {
            if let Some(dir) = &opts.artifacts {
                // Named by the input's own hash: two failures with the same message (digits
                // are left out of labels) must not overwrite each other.
                let hash = f.input().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                let path = dir.join(format!("{name}-failure-{:016x}.bin", hash));
                let _ = std::fs::write(path, f.input());
            }
            failures.push(f);
            if failures.len() >= opts.max_failures {
                break;
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    Report {
        target: name,
        inputs: ran,
        corpus: corpus.len(),
        behaviours: seen.len(),
        max_peak,
        max_share,
        elapsed: start.elapsed(),
        failures,
        depths,
    }
}
