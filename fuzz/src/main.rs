//! `mdi-fuzz`: long fuzz runs from the command line.
//!
//! ```text
//! mdi-fuzz --target ring --inputs 10000000 [--seed 7] [--jobs 2] [--artifacts fuzz/artifacts]
//! mdi-fuzz --target all --inputs 1000000
//! ```
//!
//! Jobs are threads with seeds `seed`, `seed + 1`, ..., each running its share of the inputs.
//! Failing inputs go to the artifacts folder; the one running when the process died is in
//! `<target>.current` (a little-endian u32 length, then the input).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use mdi_fuzz::engine::{fuzz, Options, Report};
use mdi_fuzz::targets;

#[derive(Parser)]
#[command(about = "Fuzz mdi's readers of outside input on stable Rust")]
struct Args {
    /// A target (gguf, safetensors, ring, control, protocol, chat) or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Inputs per target, over all jobs.
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads per target.
    #[arg(long, default_value_t = 1)]
    jobs: u64,
    #[arg(long, default_value = "fuzz/artifacts")]
    artifacts: PathBuf,
    /// Seconds one input may run before the process reports it and aborts.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

fn run_target(name: &str, args: &Args) -> Result<Report> {
    let jobs = args.jobs.max(1);
    let handles: Vec<_> = (0..jobs)
        .map(|j| {
            let name = name.to_string();
            let opts = Options {
                inputs: args.inputs / jobs + u64::from(j < args.inputs % jobs),
                seed: args.seed + j,
                artifacts: Some(args.artifacts.join(format!("{name}-{j}"))),
                max_failures: 20,
                timeout: Duration::from_secs(args.timeout_s),
                ..Options::default()
            };
            std::thread::spawn(move || {
                let mut t = targets::by_name(&name).expect("a known target");
                fuzz(t.as_mut(), &opts)
            })
        })
        .collect();
    let mut reports = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => reports.push(r),
            Err(_) => bail!("a fuzz thread of {name} panicked outside an input"),
        }
    }
    let mut total = reports.remove(0);
    for r in reports {
        total.inputs += r.inputs;
        total.corpus += r.corpus;
        total.behaviours = total.behaviours.max(r.behaviours);
        total.max_peak = total.max_peak.max(r.max_peak);
        total.max_share = total.max_share.max(r.max_share);
        total.elapsed = total.elapsed.max(r.elapsed);
        total.failures.extend(r.failures);
        for (t, d) in total.depths.iter_mut().zip(r.depths) {
            *t += d;
        }
    }
    Ok(total)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let names: Vec<&str> = if args.target == "all" {
        targets::NAMES.to_vec()
    } else if targets::NAMES.contains(&args.target.as_str()) {
        vec![args.target.as_str()]
    } else {
        bail!(
            "unknown target `{}`: use one of {} or all",
            args.target,
            targets::NAMES.join(", ")
        );
    };
    println!(
        "{:<12} {:>12} {:>10} {:>8} {:>11} {:>9} {:>26} {:>9}",
        "target", "inputs", "inputs/s", "corpus", "behaviours", "deepest", "peak alloc", "failures"
    );
    let mut failed = false;
    for name in names {
        let r = run_target(name, &args)?;
        println!(
            "{:<12} {:>12} {:>10.0} {:>8} {:>11} {:>8.1}% {:>8.1} MiB ({:>3.0}% of limit) {:>9}",
            r.target,
            r.inputs,
            r.per_second(),
            r.corpus,
            r.behaviours,
            r.depths[3] as f64 * 100.0 / r.inputs.max(1) as f64,
            r.max_peak as f64 / (1 << 20) as f64,
            r.max_share * 100.0,
            r.failures.len()
        );
        for f in &r.failures {
            println!("  {f}");
            failed = true;
        }
    }
    if failed {
        bail!(
            "failures found; their inputs are in {}",
            args.artifacts.display()
        );
    }
    Ok(())
}
