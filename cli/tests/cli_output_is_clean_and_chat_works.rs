//! The command line as a newcomer meets it: `mdi generate --chat` without `XDG_RUNTIME_DIR`
//! prints exactly the answer (no special tokens) and no loader noise; `mdi chat` in a terminal
//! holds a two-turn conversation whose answers equal the single-node greedy answers for the same
//! conversation, and `/exit` leaves with 0; each common mistake gets one line naming the cause
//! and the fix and a non-zero exit code; every command's help has examples; completions print.

use std::process::Command;

use mdi::generate::{generate, Request};
use mdi_core::{Oracle, SamplingParams, StageSpec, StageWeights};

fn mdi() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mdi"))
}

fn model_path() -> String {
    mdi::fetch::ensure_default_model()
        .expect("default model")
        .display()
        .to_string()
}

#[test]
fn the_first_command_prints_only_the_answer() {
    let out = mdi()
        .args(["generate", "--chat", "What is the capital of France?"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "The capital of France is Paris.\n");
    assert!(
        !stderr.contains("XDG_RUNTIME_DIR"),
        "loader noise: {stderr}"
    );
    assert!(!stderr.to_lowercase().contains("error"), "{stderr}");
}

/// The single-node greedy answers of a conversation, turn by turn, with the oracle.
fn expected_answers(turns: &[&str], max_tokens: usize) -> Vec<String> {
    let model = mdi::open_model(std::path::Path::new(&model_path())).unwrap();
    let spec = StageSpec::whole(&model.config);
    let weights = StageWeights::load(model.store.as_ref(), &model.config, &spec).unwrap();
    let mut oracle = Oracle::new(model.config.clone(), weights).unwrap();
    let tok = &model.tokenizer;
    let mut messages: Vec<(String, String)> = Vec::new();
    let mut answers = Vec::new();
    for t in turns {
        messages.push(("user".into(), t.to_string()));
        let pairs: Vec<(&str, &str)> = messages
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        let prompt_tokens = tok.encode(&tok.chat(&pairs).unwrap(), false).unwrap();
        let req = Request {
            prompt_tokens,
            max_tokens,
            params: SamplingParams::default(),
            eos_ids: model.config.eos_ids.clone(),
            context: model.config.context,
        };
        let gen = generate(&mut oracle, &req, |_| Ok(())).unwrap();
        let answer = tok.decode_text(&gen.tokens).unwrap();
        messages.push(("assistant".into(), answer.clone()));
        answers.push(answer);
    }
    answers
}

#[test]
fn chat_holds_a_conversation_in_a_terminal() {
    let turns = ["My name is Ada. Remember it.", "What is my name?"];
    let expected = expected_answers(&turns, 16);
    let cmd = format!(
        "{} chat --model {} --backend oracle --max-tokens 16",
        env!("CARGO_BIN_EXE_mdi"),
        model_path()
    );
    let mut p = rexpect::spawn(&cmd, Some(120_000)).expect("a pseudo-terminal");
    p.exp_string("/exit leaves").unwrap();
    p.exp_string("> ").unwrap();
    for (turn, answer) in turns.iter().zip(&expected) {
        p.send_line(turn).unwrap();
        // The answer streams out, then the next prompt.
        let printed = p.exp_string("\r\n> ").unwrap();
        assert_eq!(printed.trim(), answer.trim(), "turn {turn:?}");
    }
    p.send_line("/exit").unwrap();
    let status = p.process.wait().unwrap();
    assert!(
        matches!(status, rexpect::process::wait::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
}

fn one_line_error(args: &[&str], envs: &[(&str, &str)], wrap: Option<&str>) -> (i32, String) {
    let mut cmd = match wrap {
        Some(w) => {
            let mut c = Command::new(w);
            c.arg(if is_root() { "-n" } else { "-rn" });
            c.arg(env!("CARGO_BIN_EXE_mdi"));
            c
        }
        None => mdi(),
    };
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(out.stdout.is_empty(), "nothing on stdout");
    (out.status.code().unwrap_or(-1), err)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn mistakes_get_one_line_that_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("mdi-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let junk = junk.display().to_string();
    // (arguments, environment, wrapper command, what the message must say)
    type Case<'a> = (
        Vec<&'a str>,
        Vec<(&'a str, &'a str)>,
        Option<&'a str>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            vec!["generate", "--model", "/no/such/model.gguf", "--chat", "hi"],
            vec![],
            None,
            "no model at /no/such/model.gguf",
        ),
        (
            vec!["generate", "--model", &junk, "--chat", "hi"],
            vec![],
            None,
            "GGUF file or a Hugging Face folder",
        ),
        (
            vec!["generate", "--chat", "hi", "--backend", "gpu"],
            // No backend wgpu can use on Linux: as if the machine had no GPU driver.
            vec![("WGPU_BACKEND", "metal")],
            None,
            "use --backend cpu",
        ),
        (
            vec!["fetch"],
            // An empty cache and no network (a namespace with nothing in it).
            vec![("MDI_CACHE_DIR", dir.to_str().unwrap())],
            Some("unshare"),
            "pass --model PATH",
        ),
    ];
    for (args, envs, wrap, says) in cases {
        let (code, err) = one_line_error(&args, &envs, wrap);
        assert_ne!(code, 0, "{args:?}");
        // A note of what was being tried may come first; the error is one line, the last.
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error line, got {err:?}");
        let last = err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(says),
            "{args:?}: {err}"
        );
        assert!(!err.contains("backtrace"), "{err}");
    }
    // A wrong value is clap's business: exit 2, naming the value and the choices.
    let out = mdi()
        .args(["generate", "--chat", "hi", "--backend", "tpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'tpu'") && err.contains("cpu"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_has_examples_and_completions_print() {
    for cmd in ["generate", "chat", "node", "fetch", "bench", "completions"] {
        let out = mdi().args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Examples:"), "mdi {cmd} --help: {help}");
    }
    let out = mdi().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete"));
}

#[test]
fn ctrl_c_stops_an_answer_and_the_chat_goes_on() {
    let cmd = format!(
        "{} chat --model {} --backend cpu --max-tokens 400",
        env!("CARGO_BIN_EXE_mdi"),
        model_path()
    );
    let mut p = rexpect::spawn(&cmd, Some(120_000)).expect("a pseudo-terminal");
    p.exp_string("> ").unwrap();
    p.send_line("Tell me a long story about a dragon.").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    p.send_control('c').unwrap();
    p.exp_string("(stopped)").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/reset").unwrap();
    p.exp_string("starts over").unwrap();
    p.send_line("/exit").unwrap();
    let status = p.process.wait().unwrap();
    assert!(
        matches!(status, rexpect::process::wait::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
}
