//! Every fuzz target survives a short run — 100 000 inputs each unless `MDI_FUZZ_INPUTS` says
//! otherwise — with no panic, no abort and no input that makes the code hold more memory than
//! its configuration allows. A regression in any reader of outside input (a length that drives
//! an allocation, an unchecked product, an `unwrap` on peer data) fails here with the input.

use mdi_fuzz::engine::{fuzz, Options};
use mdi_fuzz::targets;

fn run(name: &str) {
    let inputs = std::env::var("MDI_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut t = targets::by_name(name).expect("a known target");
    let r = fuzz(
        t.as_mut(),
        &Options {
            inputs,
            seed: 0x5eed,
            ..Options::default()
        },
    );
    eprintln!(
        "{name}: {} inputs in {:.1} s, {} behaviours, depths {:?}, peak {} KiB ({:.0}% of its \
         limit)",
        r.inputs,
        r.elapsed.as_secs_f64(),
        r.behaviours,
        r.depths,
        r.max_peak >> 10,
        r.max_share * 100.0
    );
    let shown: Vec<String> = r
        .failures
        .iter()
        .map(|f| format!("{f}\n  input: {:?}", String::from_utf8_lossy(f.input())))
        .collect();
    assert!(shown.is_empty(), "{name}:\n{}", shown.join("\n"));
    assert_eq!(r.inputs, inputs);
    assert!(
        r.behaviours > 10,
        "{name} explored only {} behaviours",
        r.behaviours
    );
    // Inputs that get all the way through, not only ones refused at the first check.
    assert!(
        r.depths[3] * 100 >= r.inputs,
        "{name}: only {} of {} inputs got past the first checks",
        r.depths[3],
        r.inputs
    );
}

#[test]
fn gguf_reader() {
    run("gguf");
}

#[test]
fn safetensors_config_and_manifest_readers() {
    run("safetensors");
}

#[test]
fn ring_frames_into_node_and_starter() {
    run("ring");
}

#[test]
fn credit_and_control_messages() {
    run("control");
}

#[test]
fn signaling_messages() {
    run("protocol");
}

#[test]
fn chat_template_input() {
    run("chat");
}
